"""The `optimizer` group: AdamW plus a learning-rate schedule (diffusers' get_scheduler)."""
from __future__ import annotations

from typing import Literal

import torch


class AdamWSpec:
    def __init__(
        self,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        eps: float = 1e-8,
        schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
    ):
        self.lr, self.betas, self.weight_decay, self.eps = lr, tuple(betas), weight_decay, eps
        self.schedule, self.warmup_steps = schedule, warmup_steps

    def build(self, params, max_steps: int):
        """-> (optimizer, LR scheduler stepped once per optimizer step)."""
        from diffusers.optimization import get_scheduler

        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)
        scheduler = get_scheduler(self.schedule, optimizer, num_warmup_steps=self.warmup_steps,
                                  num_training_steps=max_steps)
        return optimizer, scheduler
