"""Training and held-out prompts, from inline lists or text files (one prompt a line)."""
from __future__ import annotations

from pathlib import Path

import torch

from rlr_cli.errors import UserError


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompt file {file} does not exist")
    prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {file} holds no prompts")
    return prompts


class PromptSource:
    """Draws training prompts uniformly (with replacement) from the run's generator; fixed eval prompts.

    Each list comes inline (train / eval) or from a file (train_file / eval_file); eval defaults to train.
    """

    def __init__(self, *, train: list[str] | None, train_file: str | None, eval: list[str] | None, eval_file: str | None):
        self.train = list(train) if train else read_prompts(train_file) if train_file else []
        if not self.train:
            raise UserError("no training prompts: set prompts.train=[...] or prompts.train_file=PATH")
        self.eval = list(eval) if eval else read_prompts(eval_file) if eval_file else self.train

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        indices = torch.randint(len(self.train), (n,), generator=generator)
        return [self.train[i] for i in indices.tolist()]

    def eval_prompts(self, n: int) -> list[str]:
        """The first n held-out prompts, cycled when fewer exist."""
        return [self.eval[i % len(self.eval)] for i in range(n)]
