"""Toy flow model: a small `SD3Transformer2DModel` (MMDiT) on 8x8x4 latents, trained with rectified flow as SD3.

The pipeline is an ordinary `StableDiffusion3Pipeline` whose two CLIP encoders are both the toy CLIP text tower
(`CLIPTextModelWithProjection`) and which has no T5. Its `encode_prompt` then gives, per prompt, the two CLIPs'
penultimate hidden states side by side (16 tokens x 128) followed by `max_sequence_length` (256) all-zero
"T5" tokens, and the two pooled projections side by side (128). Training feeds the transformer exactly that.

The 256 zero tokens are identical (the context stream has no positional embedding), so they stay identical
through every block. Softmax attention over n identical keys/values equals attention over one of them with
log(n) added to its logit, so training runs on 17 context tokens with `RepeatedTokenAttnProcessor`: the same
function of the weights (same loss, same gradients) at a fraction of the cost (272 -> 17 context tokens,
about 7x faster on CPU). The saved model has the default processors and runs on the pipeline's full context.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from rlr_cli.toy import assets, data
from rlr_cli.toy.unet import CAPTION_DROPOUT, caption_index, save_checkpoint
from rlr_cli.toy.vae import DOWNSCALE, LATENT_CHANNELS

PIPELINE_DIR = assets.ASSETS / "flow_pipeline"  # the committed StableDiffusion3Pipeline folder
NUM_TRAIN_TIMESTEPS = 1000  # the transformer sees timestep = s * 1000, s in [0, 1] the noise level
T5_PAD_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero tokens appended without T5
# transformer size: patch 1 (64 image tokens: a small shape is only 1-1.5 latent pixels across), inner dim 96
ARCH: dict[str, Any] = dict(patch_size=1, num_layers=4, attention_head_dim=32, num_attention_heads=3)


def build_transformer(text_width: int, projection_dim: int, **arch: Any) -> SD3Transformer2DModel:
    """An untrained toy MMDiT (~1.3 M params with ARCH) for 8x8x4 latents and two CLIPs of the given widths."""
    a = {**ARCH, **arch}
    size = data.IMAGE_SIZE // DOWNSCALE
    return SD3Transformer2DModel(
        sample_size=size, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        joint_attention_dim=2 * text_width,  # SD3 concatenates the two CLIPs' hidden states on the feature axis
        pooled_projection_dim=2 * projection_dim,  # ... and their pooled projections
        caption_projection_dim=a["num_attention_heads"] * a["attention_head_dim"],  # = inner dim
        pos_embed_max_size=size // a["patch_size"],  # the sincos table is saved: keep it to the latent grid
        **a,
    )


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Euler ODE sampler of the training flow, shift 1.0 (the sigmas evenly spaced in time).

    SD3 shifts towards high noise (3.0 at 1024 px, 128x128 latents) because on many pixels a given noise level
    hides less of the image; its resolution rule (shift ~ sqrt(pixels / base)) gives less than 1 for an 8x8
    latent. 1.0 is the natural choice: no shift, as in training (s is drawn without a shift), and no dynamic
    shifting (that too depends on the token count).
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


def text_encoder(clip_dir: Path) -> CLIPTextModelWithProjection:
    """The toy CLIP's text tower and text projection (the key names match the CLIPModel folder's)."""
    return CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()  # the vision keys are ignored


def build_pipeline(transformer: Any, vae_dir: Path, clip_dir: Path) -> StableDiffusion3Pipeline:
    """An SD3 pipeline: the toy VAE, the toy CLIP as both CLIP encoders (and tokenizers), no T5."""
    encoder, tokenizer = text_encoder(clip_dir), CLIPTokenizer.from_pretrained(clip_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    # SD3 decodes latents / scaling_factor + shift_factor; the toy VAE's latents are already normalised (its
    # scaling_factor is 1) and its shift_factor None, which the SD3 pipeline cannot add: 0 is the same VAE
    vae.register_to_config(shift_factor=0.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(), vae=vae,
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(encoder), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,  # pyright: ignore[reportArgumentType]
    )


def load_pipeline(device: str = "cpu", folder: Path = PIPELINE_DIR) -> StableDiffusion3Pipeline:
    """The toy flow pipeline. diffusers 0.42 does not count text_encoder_3 / tokenizer_3 as optional: a folder
    without T5 loads only when they are passed as None (the SD3 documentation's "drop T5" recipe)."""
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None).to(device)


@torch.no_grad()
def caption_table(pipe: StableDiffusion3Pipeline) -> tuple[Tensor, Tensor]:
    """The pipeline's own encode_prompt on all 192 captions then the empty prompt:
    (prompt_embeds (193, 16 + T5_PAD_TOKENS, 128), pooled (193, 128)), exactly what sampling conditions on."""
    prompts = data.all_captions() + [""]  # the same prompts for all three encoders, as the pipeline's default
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=torch.device("cpu"),
                                              do_classifier_free_guidance=False, max_sequence_length=T5_PAD_TOKENS)
    assert embeds is not None and pooled is not None
    return embeds, pooled


def compact_context(embeds: Tensor) -> tuple[Tensor, int]:
    """Full context (N, L, D) whose last tokens are identical -> (N, L - copies + 1, D) and copies."""
    copies = T5_PAD_TOKENS
    pad = embeds[:, -copies:]
    if not torch.equal(pad, pad[:, :1].expand_as(pad)):
        raise ValueError("the last T5_PAD_TOKENS context tokens are not identical: cannot compact them")
    return embeds[:, : embeds.shape[1] - copies + 1].contiguous(), copies


class RepeatedTokenAttnProcessor:
    """diffusers' JointAttnProcessor2_0 for a context whose last token stands for `copies` identical tokens.

    n identical keys with identical values contribute n * exp(q.k) * v to softmax attention, which is
    exp(q.k + log n) * v: adding log(n) to that key's logits gives the full context's output exactly.
    """

    def __init__(self, copies: int):
        self.log_copies = math.log(copies)

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, attention_mask: Any = None,
                 *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        b, n = hidden_states.shape[:2]

        def heads(x: Tensor) -> Tensor:
            return x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck, cv = heads(attn.add_k_proj(encoder_hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:  # None for ARCH (qk_norm None); kept for other configs
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, -1))  # broadcast over queries
        out = out.transpose(1, 2).reshape(b, -1, q.shape[-1] * attn.heads)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def sample_noise_level(n: int, gen: torch.Generator) -> Tensor:
    """s ~ logit-normal(0, 1), SD3's default: most samples at mid noise, where the velocity is hardest to
    predict (near s = 0 and s = 1 it is almost given by the input); SD3 found it the best of its samplers."""
    return torch.sigmoid(torch.randn(n, generator=gen))


def train_flow(transformer: Any, vae: Any, context: Tensor, pooled: Tensor, copies: int, steps: int,
               minutes: float, checkpoint: Path, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
               seed: int = 5, checkpoint_every: int = 250, device: str = "cpu") -> tuple[SD3Transformer2DModel, dict]:
    """Rectified flow: x_s = (1 - s) x0 + s noise, target velocity noise - x0, timestep s * 1000; context and
    pooled are the caption table (compacted, last context token standing for `copies` tokens).

    Trains (resuming from `checkpoint` if present) for `steps` total or `minutes` more; returns (EMA model, stats).
    Images are drawn and noise is sampled on the CPU from seeded generators, so any device sees the same data.
    """
    transformer.to(device)
    vae.to(device)
    context, pooled = context.to(device), pooled.to(device)
    processor = RepeatedTokenAttnProcessor(copies)
    transformer.set_attn_processor(processor)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = copy.deepcopy(transformer).requires_grad_(False)
    step, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        transformer.load_state_dict(state["transformer"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        warmup.load_state_dict(state["warmup"])
        step, elapsed = state["step"], state["elapsed"]
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    ema_params: list[Tensor] = list(ema.parameters())
    params: list[Tensor] = list(transformer.parameters())
    start, loss_avg = time.time(), None
    transformer.train()
    bar = tqdm(total=steps, initial=step, desc="toy flow transformer", unit="step", mininterval=5)

    def save() -> None:
        save_checkpoint(checkpoint, dict(transformer=transformer.state_dict(), ema=ema.state_dict(),
                                         opt=opt.state_dict(), warmup=warmup.state_dict(), step=step,
                                         elapsed=elapsed + time.time() - start))

    while step < steps and time.time() - start < minutes * 60:
        images, labels, _ = data.batch(batch_size, seed=seed * 1_000_003 + step)
        with torch.no_grad():
            post = vae.encode(images.to(device) * 2 - 1).latent_dist
            eps = torch.randn(post.mean.shape, generator=gen).to(device)
            x0 = post.mean + post.std * eps
        idx = caption_index(labels)
        idx[torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT] = context.shape[0] - 1  # the empty prompt
        idx = idx.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        s = sample_noise_level(batch_size, gen).to(device)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = transformer(hidden_states=xs, timestep=s * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=context[idx],
                           pooled_projections=pooled[idx], return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        warmup.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - ema_decay)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
        if step % checkpoint_every == 0:
            save()
    save()
    bar.close()
    ema.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own: the saved model runs on the full context
    ema.eval().cpu()
    return ema, {"steps": step, "seconds": elapsed + time.time() - start, "loss_ema": loss_avg}
