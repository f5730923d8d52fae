"""Toy UNet: a ~1.1 M-parameter `UNet2DConditionModel` on 8x8x4 latents, conditioned on the toy CLIP text
encoder's last hidden state (no attention mask), trained with epsilon prediction, caption dropout and EMA.
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from rlr_cli.toy import data
from rlr_cli.toy.tokenizer import MAX_LENGTH
from rlr_cli.toy.vae import DOWNSCALE, LATENT_CHANNELS

# the training noise schedule; the saved DDIMScheduler shares it
NOISE_SCHEDULE: dict[str, Any] = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon")
CAPTION_DROPOUT = 0.1  # fraction of training captions replaced by the empty prompt (for guidance)


def build_unet(cross_attention_dim: int) -> UNet2DConditionModel:
    """An untrained toy UNet (~1.08 M params) for 8x8x4 latents."""
    return UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE // DOWNSCALE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )


def ddim_scheduler() -> DDIMScheduler:
    """DDIM sampler on the training noise schedule (no clipping: latents are ~N(0,1), not [-1,1])."""
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@torch.no_grad()
def caption_table(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> Tensor:
    """Last hidden states of all 192 captions then the empty prompt: (193, MAX_LENGTH, width)."""
    prompts = data.all_captions() + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids).last_hidden_state


def caption_index(labels: data.Labels) -> Tensor:
    """Row of each label set in caption_table (the order of data.all_captions): (B,)."""
    nc, nb, nz = len(data.COLOURS), len(data.BACKGROUNDS), len(data.SIZES)
    return ((labels.shape * nc + labels.colour) * nb + labels.background) * nz + labels.size


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def train_unet(unet: Any, vae: Any, table: Tensor, steps: int, minutes: float,
               checkpoint: Path, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
               seed: int = 2, checkpoint_every: int = 250, device: str = "cpu") -> tuple[UNet2DConditionModel, dict]:
    """Train (resuming from `checkpoint` if present) for `steps` total or `minutes` more; returns (EMA unet, stats).

    Images are drawn and noise is sampled on the CPU from seeded generators, so any device sees the same data.
    """
    unet.to(device)
    vae.to(device)
    table = table.to(device)
    noise_sched: Any = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    ema = copy.deepcopy(unet).requires_grad_(False)
    step, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        warmup.load_state_dict(state["warmup"])
        step, elapsed = state["step"], state["elapsed"]
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    ema_params: list[Tensor] = list(ema.parameters())
    params: list[Tensor] = list(unet.parameters())
    start, loss_avg = time.time(), None
    unet.train()
    bar = tqdm(total=steps, initial=step, desc="toy UNet", unit="step", mininterval=5)

    def save() -> None:
        save_checkpoint(checkpoint, dict(unet=unet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                                          warmup=warmup.state_dict(), step=step,
                                          elapsed=elapsed + time.time() - start))

    while step < steps and time.time() - start < minutes * 60:
        images, labels, _ = data.batch(batch_size, seed=seed * 1_000_003 + step)
        with torch.no_grad():
            post = vae.encode(images.to(device) * 2 - 1).latent_dist
            eps = torch.randn(post.mean.shape, generator=gen).to(device)
            latents = post.mean + post.std * eps
        idx = caption_index(labels)
        idx[torch.rand(batch_size, generator=gen) < CAPTION_DROPOUT] = table.shape[0] - 1
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen).to(device)
        pred = unet(noise_sched.add_noise(latents, noise, t), t, table[idx.to(device)]).sample
        loss = F.mse_loss(pred, noise)
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
    ema.eval().cpu()
    return ema, {"steps": step, "seconds": elapsed + time.time() - start, "loss_ema": loss_avg}
