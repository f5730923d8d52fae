"""The DDIM step with its Gaussian log-probability, as in DDPO (kvablack/ddpo-pytorch).

x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps + std * z, with
std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class DDIMChain:
    """Alphas of a DDIM schedule with T inference steps; step i goes from timesteps[i] to the next one."""

    def __init__(self, scheduler, num_steps: int, eta: float):
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.clone().cpu()  # (T,) descending
        self.alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        self.step_ratio = scheduler.config.num_train_timesteps // num_steps
        self.eta = eta
        self.num_steps = num_steps

    def alphas(self, i: int) -> tuple[float, float]:
        t = int(self.timesteps[i])
        prev_t = t - self.step_ratio
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha
        return float(self.alphas_cumprod[t]), a_prev

    def std(self, i: int) -> float:
        a_t, a_prev = self.alphas(i)
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        return self.eta * math.sqrt(max(variance, 0.0))

    def mean(self, i: int, x: Tensor, eps: Tensor) -> Tensor:
        """Mean of x_prev given x (B,C,H,W) at step i and the noise prediction eps (B,C,H,W)."""
        a_t, a_prev = self.alphas(i)
        std = self.std(i)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        return math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps

    def predict_x0(self, i: int, x: Tensor, eps: Tensor) -> Tensor:
        a_t, _ = self.alphas(i)
        return (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per sample, (B,...) -> (B,), averaged (DDPO) or summed over dims."""
    if std <= 0:
        raise ValueError("log-probability of a deterministic step (std = 0) is undefined")
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.flatten(1)
    return log_prob.mean(dim=1) if reduce == "mean" else log_prob.sum(dim=1)
