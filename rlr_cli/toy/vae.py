"""Toy VAE: a tiny diffusers `AutoencoderKL` (32 px -> 8x8x4 latents) with its latent normalisation folded in.

After `fold_latent_normalisation`, `vae.encode(x).latent_dist` has per-channel zero mean and unit variance
over the data, so `scaling_factor` is 1 and an ordinary StableDiffusionPipeline needs no special code.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor
from tqdm import tqdm

from rlr_cli.toy import data

LATENT_CHANNELS = 4
DOWNSCALE = 4  # 32 px -> 8x8 latents


def build_vae() -> AutoencoderKL:
    """An untrained toy AutoencoderKL (~242 k params)."""
    config: dict[str, Any] = dict(  # a dict: diffusers annotates the block tuples as one-element
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=data.IMAGE_SIZE, scaling_factor=1.0,
    )
    return AutoencoderKL(**config)


def train_vae(vae: Any, steps: int, minutes: float, batch_size: int = 32, lr: float = 1e-3,
              seed: int = 1, device: str = "cpu") -> dict:
    """Train in place (MSE + 0.1 L1 + 1e-4 KL on images in [-1,1]); returns {"steps", "seconds", "loss"}."""
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, step, loss = time.time(), 0, torch.tensor(0.0)
    vae.train()
    with tqdm(total=steps, desc="toy VAE", unit="step") as bar:
        while step < steps and time.time() - start < minutes * 60:
            images, _, _ = data.batch(batch_size, seed=seed * 1_000_003 + step)
            x = images.to(device) * 2 - 1
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample()).sample
            loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + 1e-4 * post.kl().mean() / recon[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().cpu()
    return {"steps": step, "seconds": time.time() - start, "loss": loss.item()}


@torch.no_grad()
def latent_stats(vae: Any, n: int = 4096, seed: int = 7) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (C,) of latent samples over n training images."""
    images, _, _ = data.batch(n, seed=seed)
    z = torch.cat([vae.encode(x * 2 - 1).latent_dist.sample() for x in images.split(512)])
    return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))


@torch.no_grad()
def fold_latent_normalisation(vae: Any, mean: Tensor, std: Tensor) -> None:
    """Fold z' = (z - mean) / std into quant_conv (output) and post_quant_conv (input); scaling_factor = 1."""
    c = LATENT_CHANNELS
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2C, 2C, 1, 1): outputs [mean | logvar]
    qw[:c] /= std.view(c, 1, 1, 1)
    qb[:c] = (qb[:c] - mean) / std
    qb[c:] -= 2 * torch.log(std)  # logvar of z / std
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # (C, C, 1, 1): input z = z' * std + mean
    pb += (pw[:, :, 0, 0] @ mean)
    pw *= std.view(1, c, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


@torch.no_grad()
def roundtrip(vae: Any, images: Tensor, sample: bool = False) -> Tensor:
    """images (B,3,H,W) in [0,1] -> decoded reconstruction (B,3,H,W) in [0,1] (posterior mean unless sample)."""
    post = vae.encode(images.to(vae.device) * 2 - 1).latent_dist
    z = post.sample() if sample else post.mean
    return ((vae.decode(z).sample + 1) / 2).clamp(0, 1).to(images.device)


def psnr(a: Tensor, b: Tensor) -> float:
    """Mean PSNR in dB of images in [0,1], (B,3,H,W) each."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())

