"""Attribute judge (evaluation only): a small CNN that reads shape, colour, background and size off a toy image.

Trained on the generator's labels, half of every batch passed through the toy VAE (encode, sample, decode),
so it judges the kind of image the diffusion model produces. Use `prompt_following` to score generated
images against their prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from rlr_cli.toy import assets, data

HEADS = {"shape": data.SHAPES, "colour": data.COLOURS, "background": data.BACKGROUNDS, "size": data.SIZES}
ALL_THREE = ("shape", "colour", "background")  # "all three attributes" of the acceptance criteria


class Judge(nn.Module):
    """images (B,3,32,32) in [0,1] -> {head: logits (B, classes)} for shape, colour, background, size."""

    def __init__(self, width: int = 16, hidden: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        self.features = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),  # 16x16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if images.shape[-1] != data.IMAGE_SIZE:
            images = F.interpolate(images, size=data.IMAGE_SIZE, mode="bilinear", antialias=True)
        h = self.features(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def build_judge() -> Judge:
    """An untrained judge (~0.15 M params)."""
    return Judge()


def _mixed_batch(vae, n: int, seed: int) -> tuple[Tensor, data.Labels]:
    """n training images on the VAE's device, the second half round-tripped through the VAE (posterior sample)."""
    images, labels, _ = data.batch(n, seed=seed)
    images = images.to(vae.device)
    half = n // 2
    with torch.no_grad():
        post = vae.encode(images[half:] * 2 - 1).latent_dist
        recon = ((vae.decode(post.sample()).sample + 1) / 2).clamp(0, 1)
    return torch.cat([images[:half], recon]), labels


def train_judge(model: Judge, vae, steps: int, minutes: float, batch_size: int = 64, lr: float = 2e-3,
                seed: int = 3, device: str = "cpu") -> dict:
    """Train in place on generator labels (half VAE round-tripped); returns steps, seconds, held-out accuracies."""
    model.to(device)
    vae.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    start, step = time.time(), 0
    model.train()
    with tqdm(total=steps, desc="judge", unit="step", mininterval=5) as bar:
        while step < steps and time.time() - start < minutes * 60:
            images, labels = _mixed_batch(vae, batch_size, seed * 1_000_003 + step)
            logits = model(images)
            loss = cast(Tensor, sum(F.cross_entropy(logits[k], getattr(labels, k).to(device)) for k in HEADS))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval().cpu()
    vae.cpu()
    images, labels, _ = data.eval_batch(1024, seed=21)
    with torch.no_grad():
        post = vae.encode(images * 2 - 1).latent_dist
        recon = ((vae.decode(post.sample()).sample + 1) / 2).clamp(0, 1)
    return {"steps": step, "seconds": time.time() - start, "heldout_clean": label_accuracy(model, images, labels),
            "heldout_vae_roundtrip": label_accuracy(model, recon, labels)}


def save_judge(model: Judge, weights: Path = assets.JUDGE_WEIGHTS, config: Path = assets.JUDGE_CONFIG) -> None:
    """Write the weights (safetensors) and a JSON config (class names of each head)."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    config.write_text(json.dumps(
        {"image_size": data.IMAGE_SIZE, "input": "RGB in [0,1], (B,3,32,32)", "heads": HEADS}, indent=2) + "\n")


def load_judge(device: str = "cpu", weights: Path = assets.JUDGE_WEIGHTS, config: Path = assets.JUDGE_CONFIG) -> Judge:
    """The trained judge, in eval mode."""
    heads = json.loads(config.read_text())["heads"]
    if {k: tuple(v) for k, v in heads.items()} != HEADS:
        raise ValueError(f"{config} heads do not match the toy world's attributes")
    model = Judge()
    model.load_state_dict(load_file(weights))
    return model.to(device).eval()


@torch.no_grad()
def predict(judge: Judge, images: Tensor) -> dict[str, Tensor]:
    """images (B,3,H,W) in [0,1] -> {head: predicted class index (B,)}."""
    return {k: v.argmax(1).cpu() for k, v in judge(images.float()).items()}


def _accuracy(pred: dict[str, Tensor], truth: dict[str, Tensor]) -> dict[str, float]:
    correct = {k: pred[k] == truth[k] for k in HEADS}
    acc = {k: float(v.float().mean()) for k, v in correct.items()}
    acc["all_three"] = float(torch.stack([correct[k] for k in ALL_THREE]).all(0).float().mean())
    return acc


def label_accuracy(judge: Judge, images: Tensor, labels: data.Labels) -> dict[str, float]:
    """Judge accuracy against generator labels: {shape, colour, background, size, all_three} in [0,1]."""
    return _accuracy(predict(judge, images), {k: getattr(labels, k) for k in HEADS})


def prompt_following(images: Tensor, prompts: Sequence[str], judge: Judge | None = None) -> dict[str, float]:
    """Fraction of images whose judged attributes match their prompt.

    images (B,3,H,W) in [0,1], prompts B toy captions -> {shape, colour, background, size, all_three} in [0,1].
    """
    judge = judge or load_judge(str(images.device))
    parsed = [data.parse_caption(p) for p in prompts]
    truth = {k: torch.tensor([p[k] for p in parsed]) for k in HEADS}
    return _accuracy(predict(judge, images), truth)


class PromptFollowing:
    """Evaluation metric for the trainer: per image, 1.0 where the judge reads the prompt's attribute.

    images (B,3,H,W) in [0,1], prompts B toy captions -> {shape, colour, background, size, all_three: (B,)}.
    """

    def __init__(self):
        self.judge: Judge | None = None  # loaded on first use, on the images' device

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        if self.judge is None:
            self.judge = load_judge(str(images.device))
        with torch.no_grad():
            predicted = predict(self.judge, images)
        parsed = [data.parse_caption(p) for p in prompts]
        correct = {k: (predicted[k] == torch.tensor([p[k] for p in parsed])).float() for k in HEADS}
        correct["all_three"] = torch.stack([correct[k] for k in ALL_THREE]).prod(0)
        return correct
