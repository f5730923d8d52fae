"""CLIP-style preprocessing on tensors, differentiable: resize, centre crop (or pad), normalise. Mirrors
each reward's reference: the PIL transforms of OpenAI CLIP and BLIP (resize the shortest side, crop with
the offset rounded), transformers' CLIPImageProcessor (PickScore: the offset floored) and HPS v2's
ResizeMaxSize (the longest side to the size, black padding to a square). See tests/unit/test_rewards.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocess:
    """images (B,3,H,W) in [0,1] -> (B,3,crop_size,crop_size) normalised, with gradients."""

    size: int  # shortest side after the resize (longest with resize="longest"), pixels
    crop_size: int  # side of the square centre crop, pixels
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resize: Literal["shortest", "longest"] = "shortest"  # longest: HPS v2's ResizeMaxSize (pads, no crop)
    crop_offset: Literal["round", "floor"] = "round"  # torchvision rounds (half to even), transformers floors

    def __call__(self, images: Tensor) -> Tensor:
        if self.resize == "longest":
            images = resize_longest_side_and_pad(images, self.size)
        else:
            images = center_crop(resize_shortest_side(images, self.size), self.crop_size, self.crop_offset)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


def resize_shortest_side(images: Tensor, size: int) -> Tensor:
    """(B,C,H,W) in [0,1] -> shortest side `size` (long side truncated, as torchvision / transformers),
    bicubic with antialias, as PIL does it: width pass, clip to [0,1], height pass, clip. The clip between
    the passes matters: without it, overshoot at saturated edges differs from PIL by up to 5/255."""
    height, width = images.shape[-2:]
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    bicubic = InterpolationMode.BICUBIC
    if new_width != width:
        images = TF.resize(images, [height, new_width], interpolation=bicubic, antialias=True).clamp(0, 1)
    if new_height != height:
        images = TF.resize(images, [new_height, new_width], interpolation=bicubic, antialias=True).clamp(0, 1)
    return images


def center_crop(images: Tensor, size: int, offset: Literal["round", "floor"]) -> Tensor:
    """The square centre crop (B,C,size,size) of images at least that large; where the border is odd,
    torchvision rounds the top-left offset half to even and transformers' image processors floor it."""
    if offset == "round":
        return TF.center_crop(images, [size, size])
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_longest_side_and_pad(images: Tensor, size: int) -> Tensor:
    """HPS v2's preprocessing (its open_clip's ResizeMaxSize on the ToTensor image): the longest side to
    `size` (bicubic, antialias, sides rounded), then black padding split evenly (the odd pixel right /
    bottom) to a size x size square."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    if scale == 1.0:
        return images
    new_height, new_width = round(height * scale), round(width * scale)
    images = TF.resize(images, [new_height, new_width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_height, size - new_width
    return TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)


def _side(value) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return value["shortest_edge"]
    if value.get("height") != value.get("width"):
        raise ValueError(f"only square sizes are supported, got {value}")
    return value["height"]


def _rgb(values) -> tuple[float, float, float]:
    red, green, blue = (float(v) for v in values)
    return red, green, blue


def clip_preprocess(
    folder: str | None,
    default_size: int,
    size: int | None = None,
    crop_size: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    crop_offset: Literal["round", "floor"] = "round",
) -> ClipPreprocess:
    """Settings from `folder/preprocessor_config.json` when present, else `default_size` and the OpenAI
    CLIP mean/std; any explicit argument wins."""
    config = {}
    path = os.path.join(folder, "preprocessor_config.json") if folder else None
    if path and os.path.isfile(path):
        with open(path) as file:
            config = json.load(file)
    folder_size = _side(config.get("size")) or default_size
    folder_crop = _side(config.get("crop_size")) if config.get("do_center_crop", True) else None
    return ClipPreprocess(
        size=size or folder_size,
        crop_size=crop_size or folder_crop or size or folder_size,
        mean=_rgb(mean or config.get("image_mean") or OPENAI_CLIP_MEAN),
        std=_rgb(std or config.get("image_std") or OPENAI_CLIP_STD),
        crop_offset=crop_offset,
    )
