"""An exponential moving average of the trainable weights (Flow-GRPO: decay 0.9 every 8 steps;
DanceGRPO: 0.995). When on, evaluation and the saved adapter use the average; checkpoints hold it.

    average = decay * average + (1 - decay) * weights, every `every` optimizer steps, from the initial weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Iterator

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.ranges import Positive


@dataclass(frozen=True)
class EMAOptions:
    """trainer.ema (configs/trainer/default.yaml)."""

    decay: Annotated[float, Field(ge=0, lt=1)] | None
    every: Positive
    on_cpu: bool


class EMA:
    def __init__(self, named: dict[str, torch.nn.Parameter], options: EMAOptions):
        assert options.decay is not None
        self.params, self.decay, self.every = named, options.decay, options.every
        device = torch.device("cpu") if options.on_cpu else None
        self.average = {name: p.detach().to(device=device, copy=True) for name, p in named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based): fold the weights in every `every` steps."""
        if step % self.every:
            return
        for name, p in self.params.items():
            self.average[name].lerp_(p.detach().to(self.average[name].device), 1 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The average in the weights for the block (evaluation, saving), the training weights after it."""
        kept = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.average[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(kept[name])

    def state_dict(self) -> dict[str, Tensor]:
        return {name: value.contiguous() for name, value in self.average.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state.keys() != self.average.keys():
            raise ValueError("the checkpoint's EMA holds other weights than this model's trainable ones")
        for name, value in state.items():
            self.average[name].copy_(value)
