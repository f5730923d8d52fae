"""toy_aesthetic: a hidden rule of what looks good, and a LAION-aesthetic-shaped head that learns it from toy CLIP.

The rule (computed from the generator's ground truth, on a 0-10 scale):

    score = 10 * (0.4 * size + 0.3 * centring + 0.3 * contrast)
    size      = (radius - 4) / (12 - 4), clamped to [0,1]    radius: half-extent in pixels (small 4-6, large 9-12)
    centring  = 1 - distance(shape centre, image centre) / 12, clamped to [0,1]
    contrast  = |luma(colour) - luma(background)| / max over all colour/background pairs
                luma = 0.299 R + 0.587 G + 0.114 B

So large, centred shapes that stand out from their background score high. The head has exactly the LAION
aesthetic predictor's layout (keys layers.0, layers.2, layers.4, layers.6, layers.7) and reads the
L2-normalised toy CLIP image embedding (`get_image_features(...).pooler_output`, after CLIP preprocessing).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm
from transformers import CLIPModel

from rlr_cli.toy import assets, clip, data

SIZE_RANGE = (4.0, 12.0)  # radius giving size 0 and 1
CENTRE_FALLOFF = 12.0  # pixels from the centre at which centring reaches 0
WEIGHTS = {"size": 0.4, "centring": 0.3, "contrast": 0.3}


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor MLP: embeds (B, D) L2-normalised -> scores (B, 1)."""

    def __init__(self, input_size: int = clip.WIDTH):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def _luma(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def _contrast_table() -> Tensor:
    """(colours, backgrounds) luma contrast normalised to max 1."""
    t = torch.tensor([[abs(_luma(data.COLOUR_RGB[c]) - _luma(data.BACKGROUND_RGB[b])) for b in data.BACKGROUNDS]
                      for c in data.COLOURS])
    return t / t.max()


def rule_terms(labels: data.Labels) -> dict[str, Tensor]:
    """The rule's three terms, each (B,) in [0,1]."""
    lo, hi = SIZE_RANGE
    centre = data.IMAGE_SIZE / 2
    dist = torch.sqrt((labels.cx - centre) ** 2 + (labels.cy - centre) ** 2)
    return {
        "size": ((labels.radius - lo) / (hi - lo)).clamp(0, 1),
        "centring": (1 - dist / CENTRE_FALLOFF).clamp(0, 1),
        "contrast": _contrast_table()[labels.colour, labels.background],
    }


def rule_score(labels: data.Labels) -> Tensor:
    """The hidden aesthetic rule: labels -> scores (B,) in [0,10]."""
    terms = rule_terms(labels)
    return cast(Tensor, 10 * sum(WEIGHTS[k] * terms[k] for k in WEIGHTS))


@torch.no_grad()
def _features(model, images: Tensor) -> Tensor:
    return torch.cat([clip.image_embeds(model, x) for x in images.split(512)])


def load_head(path: Path = assets.AESTHETIC_HEAD) -> AestheticHead:
    """The trained head, in eval mode."""
    head = AestheticHead()
    head.load_state_dict(load_file(path))
    return head.eval()


@torch.no_grad()
def predict(images: Tensor, model=None, head: AestheticHead | None = None) -> Tensor:
    """images (B,3,32,32) in [0,1] -> predicted aesthetic scores (B,) on the rule's 0-10 scale."""
    model = model or assets.load_clip()[0]
    head = head or load_head()
    return head(_features(model, images)).squeeze(1)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two (N,) tensors."""
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def train_and_save(steps: int, minutes: float, clip_dir: Path = assets.CLIP_DIR, out: Path = assets.AESTHETIC_HEAD,
                   n_train: int = 16384, seed: int = 4) -> dict:
    """Fit the head on frozen toy CLIP features of n_train generator images; save to out; return held-out figures."""
    model = CLIPModel.from_pretrained(clip_dir).eval()
    start = time.time()
    images, labels, _ = data.batch(n_train, seed=seed)
    feats, target = _features(model, images), rule_score(labels)
    head = AestheticHead()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    step = 0
    with tqdm(total=steps, desc="aesthetic head", unit="step", mininterval=5) as bar:
        while step < steps and time.time() - start < minutes * 60:
            idx = torch.randint(n_train, (256,), generator=gen)
            loss = F.mse_loss(head(feats[idx]).squeeze(1), target[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(mse=f"{loss.item():.3f}", refresh=False)
    head.eval()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, out)
    ev_images, ev_labels, _ = data.eval_batch(2048, seed=31)
    pred, truth = predict(ev_images, model, head), rule_score(ev_labels)
    return {"steps": step, "seconds": time.time() - start, "heldout_pearson": pearson(pred, truth),
            "heldout_mae": float((pred - truth).abs().mean()), "heldout_rule_mean": float(truth.mean()),
            "heldout_rule_std": float(truth.std())}
