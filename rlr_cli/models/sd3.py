"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline: an MMDiT predicting velocity, CLIP-L + CLIP-G and an
optional T5), sampled on the flow chain as Flow-GRPO's SDE.

    rlr-train model=sd35_medium       # also: sd3_medium, sd35_large, toy_flow (trained toy), tiny_sd3 (random)
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.lora import LoraOptions
from rlr_cli.models.loading import Conditioning, Dtype, PipelineLoraFormat, guided, load_pipeline, vae_decode
from rlr_cli.policy import DiffusionPolicy
from rlr_cli.prompts import count_overlong
from rlr_cli.ranges import Count, NonNegativeFloat, Positive, PositiveFloat
from rlr_cli.sampling import FlowChain

SAMPLER = "flow"  # the chain this family samples (RunFacts.sampler)

class StableDiffusion3:
    """The SD3 family (interfaces.Family): joint text embeddings + pooled CLIP embeddings, velocity, CFG."""

    lora_format = PipelineLoraFormat("StableDiffusion3Pipeline", "transformer")

    def __init__(self, pipe: Any, resolution: int | None, negative_prompt: str, max_sequence_length: int):
        self.pipe, self.transformer, self.vae = pipe, pipe.transformer, pipe.vae
        self.denoiser = self.transformer
        self.scheduler_config = pipe.scheduler.config
        self.dtype, self.vae_dtype = self.transformer.dtype, self.vae.dtype
        self.vae_scale = pipe.vae_scale_factor
        self.resolution = resolution or self.transformer.config.sample_size * self.vae_scale
        self.negative_prompt, self.max_sequence_length = negative_prompt, max_sequence_length

    @property
    def image_seq_len(self) -> int:
        """Image tokens of one sample (the resolution-dependent shift of dynamic-shifting schedulers)."""
        return (self.resolution // self.vae_scale // self.transformer.config.patch_size) ** 2

    def modules(self) -> list[torch.nn.Module]:
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
        return [self.transformer, self.vae, *(encoder for encoder in encoders if encoder is not None)]

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        limit = self.pipe.tokenizer.model_max_length  # the CLIP encoders' (T5 reads max_sequence_length tokens)
        return count_overlong(self.pipe.tokenizer, prompts, limit), limit

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: bool) -> Conditioning:
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.pipe.text_encoder.device,
            do_classifier_free_guidance=negative, negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length)
        return Conditioning((embeds, pooled), (negative_embeds, negative_pooled) if negative else None)

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """Guided velocity (B,C,h,w) at timesteps t = sigma * 1000, as StableDiffusion3Pipeline calls it."""
        def call(x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
            return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                    pooled_projections=pooled, return_dict=False)[0]

        return guided(call, x, t, cond, guidance_scale, self.dtype)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        side = self.resolution // self.vae_scale
        return (batch, self.transformer.config.in_channels, side, side)

    def decode(self, latents: Tensor) -> Tensor:
        return vae_decode(self.vae, latents, self.vae_dtype)


def window_of(window: list[int] | None, num_steps: int) -> tuple[int, int] | None:
    """model.sde_window [start, stop): the transitions sampled as the SDE (None: all of them)."""
    if window is None:
        return None
    if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
        raise UserError(f"model.sde_window={list(window)}: must be [start, stop] with 0 <= start < stop <= "
                        f"model.num_steps ({num_steps})")
    return window[0], window[1]


def flow_scheduler(config: Any, shift: float | None) -> Any:
    """The pipeline's FlowMatchEulerDiscreteScheduler; with model.shift, a static shift instead of its own
    (DanceGRPO samples FLUX at shift 3 rather than FluxPipeline's resolution-dependent one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    override = {} if shift is None else {"shift": shift, "use_dynamic_shifting": False}
    return FlowMatchEulerDiscreteScheduler.from_config(config, **override)


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
    negative_prompt: str,
    resolution: Annotated[int, Field(ge=16)] | None,
    max_sequence_length: Positive,
    text_encoder_3: bool,
    lora: LoraOptions | None,
    dtype: Dtype,
    gradient_checkpointing: bool,
) -> DiffusionPolicy:
    """The `model` group of SD3 / SD3.5: load the pipeline (T5 only with text_encoder_3), sample the flow SDE."""
    from diffusers import StableDiffusion3Pipeline

    window = window_of(sde_window, num_steps)
    without_t5 = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = load_pipeline(StableDiffusion3Pipeline, path, hub_id, cache_dir, dtype, **without_t5)
    family = StableDiffusion3(pipe, resolution, negative_prompt, max_sequence_length)
    chain = FlowChain(flow_scheduler(pipe.scheduler.config, shift), num_steps, eta, window, family.image_seq_len,
                      sde_type=sde_type)
    return DiffusionPolicy(family, chain, guidance_scale, lora, gradient_checkpointing)
