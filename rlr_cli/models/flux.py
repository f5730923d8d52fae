"""FLUX.1 (FluxPipeline: a guidance-distilled MMDiT predicting velocity on packed 2x2 latent patches, CLIP-L
pooled + T5), sampled on the flow chain as Flow-GRPO's SDE. No classifier-free guidance: the guidance scale
is an input of the transformer (dev); schnell has none.

    rlr-train model=flux_dev          # also: flux_schnell, tiny_flux (random, offline)
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.lora import LoraOptions
from rlr_cli.models.loading import Conditioning, Dtype, PipelineLoraFormat, load_pipeline, vae_decode
from rlr_cli.models.sd3 import flow_scheduler, window_of
from rlr_cli.policy import DiffusionPolicy
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import Count, NonNegativeFloat, Positive, PositiveFloat
from rlr_cli.sampling import FlowChain

SAMPLER = "flow"  # the chain this family samples (RunFacts.sampler)

class Flux:
    """The FLUX family (interfaces.Family). Latents stay (B,C,h,w) in the chain; the call packs them into
    (B, h/2 * w/2, 4C) tokens with their rotary ids, as FluxPipeline does, and unpacks the velocity."""

    lora_format = PipelineLoraFormat("FluxPipeline", "transformer")

    def __init__(self, pipe: Any, resolution: int | None, max_sequence_length: int):
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.denoiser = self.transformer
        self.scheduler_config = pipe.scheduler.config
        self.dtype, self.vae_dtype = self.transformer.dtype, self.vae.dtype
        self.vae_scale = pipe.vae_scale_factor
        self.resolution = resolution or pipe.default_sample_size * self.vae_scale
        self.max_sequence_length = max_sequence_length

    @property
    def side(self) -> int:
        """Latent height and width: even, for the 2x2 packing."""
        return 2 * (self.resolution // (self.vae_scale * 2))

    @property
    def image_seq_len(self) -> int:
        return (self.side // 2) ** 2

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        """T5 carries the prompt (CLIP only its pooled summary): its limit is max_sequence_length."""
        limit = self.max_sequence_length
        return count_overlong(self.pipe.tokenizer_2, prompts, limit), limit

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool) -> Conditioning:
        """T5 embeddings, pooled CLIP embeddings and text ids; `negative` is unused (no CFG)."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.pipe.text_encoder.device,
            max_sequence_length=self.max_sequence_length)
        return Conditioning((embeds, pooled, text_ids), None)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Velocity (B,C,h,w) at timesteps t = sigma * 1000 (the transformer takes t / 1000), guidance embedded."""
        b, c, h, w = x.shape
        embeds, pooled, text_ids = cond.text
        image_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, self.dtype)
        guidance = (torch.full((b,), guidance_scale, device=x.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        tokens = self.pipe._pack_latents(x.to(self.dtype), b, c, h, w)
        out = self.transformer(hidden_states=tokens, timestep=(t / 1000).to(self.dtype), guidance=guidance,
                               pooled_projections=pooled.to(self.dtype), encoder_hidden_states=embeds.to(self.dtype),
                               txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return self.pipe._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale).float()

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.transformer.config.in_channels // 4, self.side, self.side)

    def decode(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents, self.vae_dtype)


def policy(
    *,
    path: str | None,
    hub_id: str | None,
    cache_dir: str | None,
    num_steps: Positive,
    eta: NonNegativeFloat,
    sde_type: Literal["flow_grpo", "dance_grpo"],
    sde_window: list[Count] | None,
    shift: PositiveFloat | None,
    guidance_scale: NonNegativeFloat,
    resolution: Annotated[int, Field(ge=16)] | None,
    max_sequence_length: Positive,
    lora: LoraOptions | None,
    dtype: Dtype,
    gradient_checkpointing: bool,
) -> DiffusionPolicy:
    """The `model` group of FLUX.1: load the pipeline, sample the flow SDE on FluxPipeline's shifted sigmas."""
    from diffusers import FluxPipeline

    window = window_of(sde_window, num_steps)
    pipe = load_pipeline(FluxPipeline, path, hub_id, cache_dir, dtype)
    family = Flux(pipe, resolution, max_sequence_length)
    chain = FlowChain(flow_scheduler(pipe.scheduler.config, shift), num_steps, eta, window, family.image_seq_len,
                      linear_sigmas=True, sde_type=sde_type)
    return DiffusionPolicy(family, chain, guidance_scale, lora, gradient_checkpointing)
