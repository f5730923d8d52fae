"""Stable Diffusion 1.x (StableDiffusionPipeline: UNet, CLIP-L text encoder, VAE), sampled with DDIM.

    rlr-train model=sd15              # also: sd14, toy (the embedded toy world), tiny (random, offline)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.lora import LoraOptions
from rlr_cli.models.loading import Dtype, load_pipeline, vae_decode
from rlr_cli.policy import DiffusionPolicy
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import NonNegativeFloat
from rlr_cli.sampling import DDIMChain


@dataclass(frozen=True)
class TextConditioning:
    """Prompt embeddings (B,L,D) and, for classifier-free guidance, the negative prompt's (B,L,D)."""

    embeds: Tensor
    negative: Tensor | None


class UNetLoraFormat:
    """LoRA files of StableDiffusionPipeline (keys `unet.*`)."""

    prefix = "unet"

    def save(self, directory: str, layers: dict[str, Tensor], metadata: dict) -> None:
        from diffusers import StableDiffusionPipeline

        unet_layers: dict[str, torch.nn.Module | Tensor] = dict(layers)
        StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=unet_layers, safe_serialization=True,
                                                  unet_lora_adapter_metadata=metadata)

    def load_into(self, network: torch.nn.Module, state: dict, alphas: dict | None, metadata: dict | None,
                  adapter_name: str) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.load_lora_into_unet(state, alphas, network, adapter_name=adapter_name, metadata=metadata)


class StableDiffusion:
    """The SD 1.x family (interfaces.Family): CLIP text embeddings, a UNet predicting noise, CFG."""

    lora_format = UNetLoraFormat()

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

    def encode(self, prompts: Sequence[str], negative: bool) -> TextConditioning:
        return TextConditioning(self._embed(prompts), self._embed([self.negative_prompt] * len(prompts)) if negative else None)

    def predict(self, x: Tensor, t: Tensor, cond: TextConditioning, guidance_scale: float) -> Tensor:
        """Guided noise prediction (B,C,h,w): one UNet call, the unconditional and text halves batched."""
        dtype = self.unet_dtype
        if guidance_scale == 1.0 or cond.negative is None:
            return self.unet(x.to(dtype), t, cond.embeds.to(dtype)).sample.float()
        both = self.unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]),
                         torch.cat([cond.negative, cond.embeds]).to(dtype)).sample.float()
        uncond, text = both.chunk(2)
        return uncond + guidance_scale * (text - uncond)

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

