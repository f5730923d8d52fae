"""Training and held-out prompts, from inline lists or text files (one prompt a line).

A prompt may carry DiffCoT stage prompts [secondhand: the RLR paper's note]: `prompt || coarse || mid || fine`
(any number of stages). The chain is cut into that many equal segments, each conditioned on its stage's
prompt, coarse first; the reward, the metrics and every log see the first field alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rlr_cli.errors import UserError


def read_text(file: Path, what: str) -> str:
    """A UTF-8 text file's contents; a file in another encoding is one line naming the first bad byte."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {file} is not UTF-8 text: byte {error.start} is 0x{data[error.start]:02x} "
                        f"(save it as UTF-8)") from None


def count_overlong(tokenizer: Any, prompts: Sequence[str], limit: int) -> int:
    """How many prompts a transformers tokenizer makes longer than limit tokens (the text encoder cuts them)."""
    if not prompts:
        return 0
    ids = tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
    return sum(len(row) > limit for row in ids)


def overlong_warning(program: str, cut: int, total: int, limit: int, what: str) -> str:
    return (f"{program}: warning: {cut} of {total} prompts are longer than {what}'s {limit} tokens and are cut "
            f"to {limit}")


STAGE_SEPARATOR = "||"


class StagedPrompt(str):
    """A prompt (the str itself: what rewards and logs read) with the prompts of the chain's stages."""

    stages: tuple[str, ...]

    def __new__(cls, prompt: str, stages: Sequence[str] = ()) -> StagedPrompt:
        staged = super().__new__(cls, prompt)
        staged.stages = tuple(stages)
        return staged


def parse_prompt(text: str, where: str) -> str:
    """`prompt || stage || ...` -> a StagedPrompt; a line without the separator stays a plain str."""
    if STAGE_SEPARATOR not in text:
        return text
    fields = [field.strip() for field in text.split(STAGE_SEPARATOR)]
    if not all(fields) or len(fields) < 3:
        raise UserError(f"{where}: {text!r} is not `prompt || stage prompt || stage prompt ...` (a prompt, then at "
                        "least two non-empty stage prompts, coarse first)")
    return StagedPrompt(fields[0], fields[1:])


def stage_count(prompts: Sequence[str], where: str) -> int:
    """The number of stages every staged prompt of the list has (0: none staged)."""
    counts = {len(p.stages) for p in prompts if isinstance(p, StagedPrompt)}
    if len(counts) > 1:
        raise UserError(f"{where}: staged prompts with {sorted(counts)} stages; every prompt needs the same number")
    return counts.pop() if counts else 0


def read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"prompt file {file} does not exist")
    prompts = [line.strip() for line in read_text(file, "prompt file").splitlines() if line.strip()]
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
        self.train = [parse_prompt(p, "prompts.train") for p in self.train]
        self.eval = [parse_prompt(p, "prompts.eval") for p in self.eval]
        stage_count(self.train + self.eval, "prompts")

    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        indices = torch.randint(len(self.train), (n,), generator=generator)
        return [self.train[i] for i in indices.tolist()]

    def distinct(self) -> list[str]:
        """Every prompt this source hands out, training and held-out, once each."""
        return list(dict.fromkeys(self.train + self.eval))

    def eval_prompts(self, n: int) -> list[str]:
        """The first n held-out prompts, cycled when fewer exist."""
        return [self.eval[i % len(self.eval)] for i in range(n)]
