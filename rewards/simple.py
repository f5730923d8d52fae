"""Rewards that need no weights: JPEG (in)compressibility (DDPO) and colour saturation."""
from __future__ import annotations

import io
from typing import Annotated, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch import Tensor


def _jpeg_kb(image: Tensor, quality: int) -> float:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


class JpegCompressibility:
    """Minus the JPEG file size in kB (quality 95, as DDPO); `incompressible` flips the sign."""

    differentiable = False

    def __init__(self, *, incompressible: bool, quality: Annotated[int, Field(ge=1, le=100)]):
        self.sign = 1.0 if incompressible else -1.0
        self.quality = quality

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        sizes = [_jpeg_kb(image, self.quality) for image in images]
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=images.device)


class Saturation:
    """Mean HSV-style saturation (max - min over RGB) in [0,1]; differentiable, needs no weights."""

    differentiable = True

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        channel_max, channel_min = images.amax(dim=1), images.amin(dim=1)
        return (channel_max - channel_min).flatten(1).mean(dim=1).float()
