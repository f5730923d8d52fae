"""Stable Diffusion XL (StableDiffusionXLPipeline: a UNet predicting noise, CLIP-L + OpenCLIP-G with pooled
embeddings and size / crop micro-conditioning), sampled with DDIM as SD 1.x.

    rlr-train model=sdxl              # also: tiny_sdxl (random, offline)
"""
from __future__ import annotations

from typing import Annotated, Any, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.lora import LoraOptions
from rlr_cli.models.loading import Conditioning, Dtype, PipelineLoraFormat, guided, load_pipeline
from rlr_cli.models.sd import StableDiffusion
from rlr_cli.policy import DiffusionPolicy
from rlr_cli.ranges import NonNegativeFloat, Positive
from rlr_cli.sampling import DDIMChain

SAMPLER = "ddim"  # the chain this family samples (RunFacts.sampler)

class StableDiffusionXL(StableDiffusion):
    """The SDXL family: SD 1.x's chain and decoder; two text encoders, pooled embeddings and add_time_ids."""

    lora_format = PipelineLoraFormat("StableDiffusionXLPipeline", "unet")

    def __init__(self, pipe: Any, resolution: int | None, negative_prompt: str):
        super().__init__(pipe, resolution, negative_prompt)
        self.pipe = pipe

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.pipe.text_encoder, self.pipe.text_encoder_2]

    def _time_ids(self, batch: int) -> Tensor:
        """(B, 6): original size, crop origin (0, 0) and target size, all the sampled resolution, as the pipeline's default."""
        size = (self.resolution, self.resolution)
        ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                          text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim)
        return ids.repeat(batch, 1).to(self.unet.device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool) -> Conditioning:
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.pipe.text_encoder.device, num_images_per_prompt=1,
            do_classifier_free_guidance=negative, negative_prompt=[self.negative_prompt] * len(prompts))
        time_ids = self._time_ids(len(prompts))
        return Conditioning((embeds, pooled, time_ids), (negative_embeds, negative_pooled, time_ids) if negative else None)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        def call(x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
            return self.unet(x, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

        return guided(call, x, t, cond, guidance_scale, self.unet_dtype)


def policy(
    *,
    path: str | None,
    hub_id: str | None,
    cache_dir: str | None,
    num_steps: Positive,
    eta: NonNegativeFloat,
    guidance_scale: NonNegativeFloat,
    negative_prompt: str,
    resolution: Annotated[int, Field(ge=8)] | None,
    lora: LoraOptions | None,
    dtype: Dtype,
    gradient_checkpointing: bool,
) -> DiffusionPolicy:
    """The `model` group of SDXL: load the pipeline, sample it with DDIM (eta) and CFG."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = load_pipeline(StableDiffusionXLPipeline, path, hub_id, cache_dir, dtype)
    chain = DDIMChain(DDIMScheduler.from_config(pipe.scheduler.config), num_steps, eta)
    return DiffusionPolicy(StableDiffusionXL(pipe, resolution, negative_prompt), chain, guidance_scale, lora,
                           gradient_checkpointing)
