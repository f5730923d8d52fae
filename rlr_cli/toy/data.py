"""Procedural coloured-shape images with captions: the toy world's data, deterministic from a seed.

Each image is drawn at 2x (64x64) and averaged down to 32x32 (anti-aliasing). Caption:
"a {size} {colour} {shape} on a {background} background". Training draws seeds below EVAL_SEED_BASE;
held-out evaluation draws seeds at or above it, so no evaluation image is ever seen in training.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from rlr_cli.ranges import Positive

IMAGE_SIZE = 32  # pixels, final resolution
SUPERSAMPLE = 2  # drawn at 2x then averaged down
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("black", "white", "gray", "brown")
SIZES = ("small", "large")
COLOUR_RGB = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (150, 40, 200), "orange": (250, 140, 20),
}
BACKGROUND_RGB = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128), "brown": (110, 70, 40)}
RADIUS_RANGE = {"small": (4.0, 6.0), "large": (9.0, 12.0)}  # half-extent in final pixels, uniform
EVAL_SEED_BASE = 1_000_000_000  # seeds >= this are held out for evaluation


@dataclass(frozen=True)
class Labels:
    """Ground truth of a batch; every field (B,). Indices into SHAPES / COLOURS / BACKGROUNDS / SIZES.

    radius, cx, cy are in final pixels (cx, cy the shape's centre, 0..IMAGE_SIZE).
    """

    shape: Tensor
    colour: Tensor
    background: Tensor
    size: Tensor
    radius: Tensor
    cx: Tensor
    cy: Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]


def caption(shape: int, colour: int, background: int, size: int) -> str:
    """Caption of one attribute combination."""
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]} on a {BACKGROUNDS[background]} background"


def captions(labels: Labels) -> list[str]:
    """Captions of a batch of labels."""
    return [
        caption(int(s), int(c), int(b), int(z))
        for s, c, b, z in zip(labels.shape, labels.colour, labels.background, labels.size)
    ]


def all_captions() -> list[str]:
    """Every distinct caption (192), in a fixed order: the training prompts."""
    return [caption(s, c, b, z) for s, c, b, z in itertools.product(
        range(len(SHAPES)), range(len(COLOURS)), range(len(BACKGROUNDS)), range(len(SIZES)))]


def parse_caption(text: str) -> dict[str, int]:
    """Inverse of `caption`: {"shape", "colour", "background", "size"} indices; ValueError if malformed."""
    words = text.strip().lower().split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"not a toy caption: {text!r}")
    return {
        "size": SIZES.index(words[1]), "colour": COLOURS.index(words[2]),
        "shape": SHAPES.index(words[3]), "background": BACKGROUNDS.index(words[6]),
    }


def sample_labels(n: int, seed: int) -> Labels:
    """n random attribute sets, deterministic from seed."""
    g = torch.Generator().manual_seed(seed)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=g)
    size = torch.randint(len(SIZES), (n,), generator=g)
    lo = torch.tensor([RADIUS_RANGE[s][0] for s in SIZES])[size]
    hi = torch.tensor([RADIUS_RANGE[s][1] for s in SIZES])[size]
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    margin = radius + 1.0  # keep the whole shape inside the frame
    cx = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=g)
    cy = margin + (IMAGE_SIZE - 2 * margin) * torch.rand(n, generator=g)
    return Labels(shape, colour, background, size, radius, cx, cy)


def _masks(labels: Labels, res: int) -> Tensor:
    """Shape masks (B, res, res) in {0,1} at resolution res (coordinates scaled from IMAGE_SIZE)."""
    scale = res / IMAGE_SIZE
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / scale  # pixel centres in final units
    y, x = coords.view(1, res, 1), coords.view(1, 1, res)
    dx = x - labels.cx.view(-1, 1, 1)
    dy = y - labels.cy.view(-1, 1, 1)
    r = labels.radius.view(-1, 1, 1)
    circle = dx**2 + dy**2 <= r**2
    square = (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    # upward triangle: apex at top (cy - r), base at cy + 0.8 r
    t = (dy + r) / (1.8 * r)  # 0 at apex, 1 at base
    triangle = (t >= 0) & (t <= 1) & (dx.abs() <= t * r)
    arm = 0.35 * r
    cross = ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    stacked = torch.stack([circle, square, triangle, cross], dim=1)  # (B, 4, res, res)
    return stacked[torch.arange(len(labels)), labels.shape].float()


def render(labels: Labels) -> Tensor:
    """Draw labels: -> images (B,3,IMAGE_SIZE,IMAGE_SIZE) in [0,1], drawn at 2x and averaged down."""
    res = IMAGE_SIZE * SUPERSAMPLE
    mask = _masks(labels, res).unsqueeze(1)
    fg = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)[labels.colour] / 255.0
    bg = torch.tensor([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=torch.float32)[labels.background] / 255.0
    big = mask * fg.view(-1, 3, 1, 1) + (1 - mask) * bg.view(-1, 3, 1, 1)
    return torch.nn.functional.avg_pool2d(big, SUPERSAMPLE)


def batch(n: int, seed: int) -> tuple[Tensor, Labels, list[str]]:
    """A training batch: images (n,3,32,32) in [0,1], labels, captions; seed must be < EVAL_SEED_BASE."""
    if not 0 <= seed < EVAL_SEED_BASE:
        raise ValueError(f"training seeds are in [0, {EVAL_SEED_BASE}), got {seed}")
    labels = sample_labels(n, seed)
    return render(labels), labels, captions(labels)


def eval_batch(n: int, seed: int = 0) -> tuple[Tensor, Labels, list[str]]:
    """A held-out batch (seed offset by EVAL_SEED_BASE): images (n,3,32,32) in [0,1], labels, captions."""
    labels = sample_labels(n, EVAL_SEED_BASE + seed)
    return render(labels), labels, captions(labels)


def eval_prompts(n: Positive, seed: int = 0) -> list[str]:
    """n held-out evaluation prompts (captions of held-out seeds; same as eval_batch(n, seed) captions)."""
    return captions(sample_labels(n, EVAL_SEED_BASE + seed))


def diffcot(prompts: list[str]) -> list[str]:
    """Toy captions with DiffCoT stage prompts (rlr_cli.prompts' `prompt || coarse || mid || fine`): the
    background first (what the noisiest steps settle), then the sized, coloured shape, then the whole caption."""
    staged = []
    for text in prompts:
        c = parse_caption(text)
        background, shape = BACKGROUNDS[c["background"]], f"a {SIZES[c['size']]} {COLOURS[c['colour']]} {SHAPES[c['shape']]}"
        staged.append(f"{text} || on a {background} background || {shape} || {text}")
    return staged
