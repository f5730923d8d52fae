"""What the model families share: loading a diffusers pipeline from a local folder or the hub (one clear
error when it cannot be had), their LoRA files, the guided denoiser call, and decoding."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from rlr_cli.errors import UserError

Dtype = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_pipeline(pipeline_class: Any, path: str | None, hub_id: str | None, cache_dir: str | None,
                  dtype: Dtype, **kwargs: Any) -> Any:
    """`pipeline_class.from_pretrained` of model.path, else model.hub_id; a UserError naming both keys."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # an offline hub is our one-line error below, not its warnings too
    source = path or hub_id
    if source is None:
        raise UserError("no model given: set model.path=/local/folder or model.hub_id=org/name")
    if path is not None and not Path(path).is_dir():
        raise UserError(f"model.path={path} is not a folder holding a diffusers {pipeline_class.__name__}")
    try:
        return pipeline_class.from_pretrained(source, dtype=DTYPES[dtype], cache_dir=cache_dir, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        if path is not None:
            raise UserError(f"could not load the pipeline in {path}: {error}") from None
        raise UserError(
            f"could not fetch '{hub_id}' from the hub (offline or not cached). Download it where the hub is "
            f"reachable (hf download {hub_id}) and pass model.path=/local/folder"
        ) from None


class PipelineLoraFormat:
    """LoRA files of a diffusers pipeline class (interfaces.LoraFormat): its `save_lora_weights` writes them
    with keys `<prefix>.*`, prefix the denoiser's name (unet | transformer)."""

    def __init__(self, pipeline: str, prefix: str):
        self.pipeline, self.prefix = pipeline, prefix

    def save(self, directory: str, layers: dict[str, torch.Tensor], metadata: dict) -> None:
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline)
        pipeline_class.save_lora_weights(directory, safe_serialization=True, **{
            f"{self.prefix}_lora_layers": dict(layers), f"{self.prefix}_lora_adapter_metadata": metadata})

    def load_into(self, network: torch.nn.Module, state: dict, alphas: dict | None, metadata: dict | None,
                  adapter_name: str) -> None:
        network.load_lora_adapter(state, prefix=self.prefix, network_alphas=alphas,  # type: ignore[operator]
                                  adapter_name=adapter_name, metadata=metadata)


@dataclass(frozen=True)
class Conditioning:
    """A prompt batch's conditioning tensors, each (B, ...), and for classifier-free guidance the negative
    prompt's, in the order the family's denoiser takes them."""

    text: tuple[torch.Tensor, ...]
    negative: tuple[torch.Tensor, ...] | None


def guided(call: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
           guidance_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """call(x, t, *conditioning) in dtype -> float32 output; with guidance, the unconditional and text halves
    in one batched call: uncond + scale * (text - uncond)."""
    if guidance_scale == 1.0 or cond.negative is None:
        return call(x.to(dtype), t, *(c.to(dtype) for c in cond.text)).float()
    parts = (torch.cat([negative, text]).to(dtype) for negative, text in zip(cond.negative, cond.text))
    uncond, text = call(torch.cat([x, x]).to(dtype), torch.cat([t, t]), *parts).float().chunk(2)
    return uncond + guidance_scale * (text - uncond)


def vae_decode(vae: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents (B,C,h,w) -> the VAE's images (B,3,H,W) in [-1, 1], float32; dtype: the VAE's."""
    config = vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return vae.decode(latents.to(dtype)).sample.float()
