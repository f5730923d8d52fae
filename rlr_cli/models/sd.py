"""Stable Diffusion 1.x (StableDiffusionPipeline: UNet, CLIP-L text encoder, VAE), sampled with DDIM.

    rlr-train model=sd15              # also: sd14, toy (the embedded toy world), tiny (random, offline)
"""
from __future__ import annotations

from typing import Annotated, Any, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.lora import LoraOptions
from rlr_cli.models.loading import Conditioning, Dtype, PipelineLoraFormat, guided, load_pipeline, vae_decode
from rlr_cli.policy import DiffusionPolicy
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import NonNegativeFloat
from rlr_cli.sampling import DDIMChain

SAMPLER = "ddim"  # the chain this family samples (RunFacts.sampler)

class StableDiffusion:
    """The SD 1.x family (interfaces.Family): CLIP text embeddings, a UNet predicting noise, CFG."""

    lora_format = PipelineLoraFormat("StableDiffusionPipeline", "unet")

    def __init__(self, pipe: Any, resolution: int | None, negative_prompt: str):
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.denoiser = self.unet
        self.scheduler_config = pipe.scheduler.config
        self.unet_dtype, self.vae_dtype = self.unet.dtype, self.vae.dtype  # diffusers walks every module per read
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.unet.config.sample_size * self.vae_scale
        self.negative_prompt = negative_prompt

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        limit = self.tokenizer.model_max_length
        return count_overlong(self.tokenizer, prompts, limit), limit

    def encode(self, prompts: Sequence[str], negative: bool) -> Conditioning:
        return Conditioning((self._embed(prompts),),
                            (self._embed([self.negative_prompt] * len(prompts)),) if negative else None)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Guided noise prediction (B,C,h,w): one UNet call, the unconditional and text halves batched."""
        return guided(lambda x, t, embeds: self.unet(x, t, embeds).sample, x, t, cond, guidance_scale, self.unet_dtype)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale
        return (batch, self.unet.config.in_channels, side, side)

    def decode(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents, self.vae_dtype)


def policy(
    *,
    path: str | None,
    hub_id: str | None,
    cache_dir: str | None,
    num_steps: Annotated[int, Field(ge=1)],
    eta: Annotated[float, Field(ge=0)],
    guidance_scale: NonNegativeFloat,
    negative_prompt: str,
    resolution: Annotated[int, Field(ge=8)] | None,
    lora: LoraOptions | None,
    dtype: Dtype,
    gradient_checkpointing: bool,
) -> DiffusionPolicy:
    """The `model` group of SD 1.x: load the pipeline, sample it with DDIM (eta) and CFG."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = load_pipeline(StableDiffusionPipeline, path, hub_id, cache_dir, dtype, safety_checker=None,
                         requires_safety_checker=False)
    chain = DDIMChain(DDIMScheduler.from_config(pipe.scheduler.config), num_steps, eta)
    return DiffusionPolicy(StableDiffusion(pipe, resolution, negative_prompt), chain, guidance_scale, lora,
                           gradient_checkpointing)

