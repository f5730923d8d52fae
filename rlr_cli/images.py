"""Image grids with captions, for samples/step_N.png and before/after comparisons.

torchvision's make_grid lays the images out (each with white room below it for its caption) and PIL
writes the captions, far faster than matplotlib drew the same grid (scripts/bench_grid.py, BENCHMARKS.md).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

CELL = 128  # smallest image side in the grid, pixels: small images are enlarged (nearest) to be readable
CAPTION_LINES, LINE_HEIGHT, FONT_SIZE, PAD = 4, 12, 10, 4


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def save_grid(images: Tensor, captions: Sequence[str], path: Path, title: str = "", columns: int = 8) -> None:
    """images (N,3,H,W) in [0,1] -> one PNG, each image above its wrapped caption (and a title above all)."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    images = images.float().clamp(0, 1)
    scale = max(1, math.ceil(CELL / images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    side = images.shape[-1]
    caption_room = CAPTION_LINES * LINE_HEIGHT + PAD
    cells = torch.nn.functional.pad(images, (0, 0, 0, caption_room), value=1.0)  # white room below each image
    columns = min(columns, len(images))
    grid = make_grid(cells, nrow=columns, padding=PAD, pad_value=1.0)
    title_room = LINE_HEIGHT + 2 * PAD if title else 0
    pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    canvas = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + title_room), "white")
    canvas.paste(Image.fromarray(pixels), (0, title_room))
    draw, font = ImageDraw.Draw(canvas), _font(FONT_SIZE)
    if title:
        draw.text((PAD, PAD), title, fill="black", font=font)
    chars = max(8, int(side / 5.6))  # about 5.6 px per character at this font size
    for index, caption in enumerate(captions):
        row, column = divmod(index, columns)
        x = PAD + column * (side + PAD)
        y = title_room + PAD + row * (side + caption_room + PAD) + side + PAD // 2
        for number, line in enumerate(_caption_lines(caption, chars)):
            draw.text((x, y + number * LINE_HEIGHT), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def _caption_lines(caption: str, chars: int) -> list[str]:
    """At most CAPTION_LINES wrapped lines; the caption's last line (the score) is always kept."""
    *text, last = caption.splitlines() or [""]
    wrapped = [line for part in text for line in textwrap.wrap(part, chars)]
    room = CAPTION_LINES - 1
    if len(wrapped) > room:
        wrapped = wrapped[: room - 1] + [textwrap.shorten(" ".join(wrapped[room - 1:]), chars, placeholder="...")]
    return wrapped + textwrap.wrap(last, chars)[:1]
