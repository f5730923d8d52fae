"""The `optimizer` group: AdamW plus a learning-rate schedule (diffusers' get_scheduler)."""
from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field


class AdamWSpec:
    """The `optimizer` group (values: configs/optimizer/adamw.yaml)."""

    def __init__(
        self,
        *,
        lr: Annotated[float, Field(gt=0)],
        betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]],
        weight_decay: Annotated[float, Field(ge=0)],
        eps: Annotated[float, Field(gt=0)],
        schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"],
        warmup_steps: Annotated[int, Field(ge=0)],
    ):
        self.lr, self.betas, self.weight_decay, self.eps = lr, (betas[0], betas[1]), weight_decay, eps
        self.schedule, self.warmup_steps = schedule, warmup_steps

    def build(self, params, max_steps: int):
        """-> (optimizer, LR scheduler stepped once per optimizer step)."""
        from diffusers.optimization import get_scheduler

        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)
        scheduler = get_scheduler(self.schedule, optimizer, num_warmup_steps=self.warmup_steps,
                                  num_training_steps=max_steps)
        return optimizer, scheduler
