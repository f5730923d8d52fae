"""Loading a diffusers pipeline from a local folder or the hub, with one clear error when it cannot be had."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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


def vae_decode(vae: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scaled latents (B,C,h,w) -> the VAE's images (B,3,H,W) in [-1, 1], float32; dtype: the VAE's."""
    config = vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    return vae.decode(latents.to(dtype)).sample.float()
