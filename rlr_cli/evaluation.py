"""The one evaluator: held-out prompts sampled with fixed seeds, scored by the trained reward and by
other metrics (reward hacking shows as one going up while the others fall). The trainer (`eval/step_N.json`)
and `rlr-eval` (`eval.json`) write the same record:

    {"step", "prompts", "reward" (its name), "reward_mean", "reward_std", "reward_se", "rewards" (per prompt),
     "metrics": {name: {"mean", "std", "se", "scores"}}}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from rlr_cli.images import save_grid
from rlr_cli.interfaces import Chain, Metric, Policy
from rlr_cli.run_folder import write_json


@dataclass(frozen=True)
class Evaluation:
    prompts: list[str]
    images: Tensor  # (N,3,H,W) in [0,1], float32 on the CPU
    reward: Tensor  # (N,) the trained reward
    metrics: dict[str, Tensor]  # name -> (N,)


def stats(values: Tensor) -> dict[str, float]:
    """mean, std and standard error of (N,) values."""
    std = values.std().item() if len(values) > 1 else 0.0
    return {"mean": values.mean().item(), "std": std, "se": std / math.sqrt(len(values))}


def _per_sample(name: str, output: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
    """A metric's output, (B,) or {key: (B,)}, as {metric key: (B,) float on the CPU}."""
    if isinstance(output, dict):
        return {f"{name}_{key}": value.float().cpu() for key, value in output.items()}
    return {name: output.float().cpu()}


@torch.no_grad()
def evaluate(policy: Policy, reward: Metric, metrics: Mapping[str, Metric], prompts: Sequence[str], seed: int,
             batch_size: int, progress: bool = False, chain: Chain | None = None) -> Evaluation:
    """Sample the prompts with one generator seeded `seed` (the same images every time), on `chain` (None:
    the policy's), and score them."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    images, rewards, extra = [], [], {}
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        chunk = list(prompts[start : start + batch_size])
        batch = policy.decode(policy.sample(chunk, generator=generator, chain=chain).final)
        rewards.append(_per_sample("reward", reward(batch, chunk))["reward"])
        for name, metric in metrics.items():
            for key, values in _per_sample(name, metric(batch, chunk)).items():
                extra.setdefault(key, []).append(values)
        images.append(batch.float().cpu())
    return Evaluation(list(prompts), torch.cat(images), torch.cat(rewards),
                      {key: torch.cat(values) for key, values in extra.items()})


def record(evaluation: Evaluation, reward_name: str, step: int | None = None, **extra: object) -> dict:
    reward = stats(evaluation.reward)
    return {
        "step": step, **extra, "prompts": evaluation.prompts, "reward": reward_name,
        **{f"reward_{key}": value for key, value in reward.items()}, "rewards": evaluation.reward.tolist(),
        "metrics": {key: stats(values) | {"scores": values.tolist()} for key, values in evaluation.metrics.items()},
    }


def write(evaluation: Evaluation, result: dict, json_path: Path, grid_path: Path, title: str) -> list[str]:
    """The record as JSON and the images as a captioned grid; returns the captions."""
    write_json(json_path, result)
    captions = [f"{p}\nr={r:.3g}" for p, r in zip(evaluation.prompts, evaluation.reward.tolist())]
    save_grid(evaluation.images, captions, grid_path, title=title)
    return captions
