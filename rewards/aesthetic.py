"""LAION aesthetic predictor: a 5-layer head on L2-normalised CLIP image features (DDPO, AlignProp, RLR).

The head's input width is the CLIP's projection_dim, so the same class scores the toy world
(`toy_aesthetic`: toy CLIP with projection 64 and a 64-1024-128-64-16-1 head).
"""
from __future__ import annotations

from typing import Literal, Sequence

from torch import Tensor

from rewards.clip_score import load_clip
from rewards.common import (
    MLPHead,
    checkpoint_layers,
    follow_device,
    freeze,
    load_strict,
    read_state_dict,
    resolve_file,
    torch_dtype,
)
from rewards.preprocess import clip_preprocess
from rlr_cli.ranges import Positive


class AestheticScore:
    """head(normalise(CLIP image features)); images (B,3,H,W) in [0,1] -> (B,), about 5-6 for SD 1.x."""

    differentiable = True

    def __init__(
        self,
        *,
        path: str,
        head: str,
        cache_dir: str | None,
        dtype: Literal["fp32", "bf16", "fp16"],
        gradient_checkpointing: bool,
        image_size: Positive | None,
        crop_size: Positive | None,
        mean: list[float] | None,
        std: list[float] | None,
    ):
        what = "reward aesthetic"
        self.dtype = torch_dtype(dtype)
        model, folder = load_clip(path, cache_dir, what)
        head_file = resolve_file(head, cache_dir=cache_dir, key="head", what=what)
        self.head = MLPHead(model.config.projection_dim)
        load_strict(self.head, read_state_dict(head_file, what), f"{what} head {head_file}")
        self.head = freeze(self.head, self.dtype)
        self.model = freeze(model, self.dtype)
        if gradient_checkpointing:
            checkpoint_layers(self.model.vision_model.encoder.layers)
        self.preprocess = clip_preprocess(
            folder, model.config.vision_config.image_size, image_size, crop_size, mean, std
        )

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        follow_device([self.model, self.head], images.device)
        pixels = self.preprocess(images.float()).to(self.dtype)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        features = features / features.norm(dim=-1, keepdim=True)
        return self.head(features).float()
