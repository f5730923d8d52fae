"""Helpers shared by the estimators: the objective applied to raw rewards, and reward evaluation."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Policy, Reward


def utility(rewards: Tensor, target: float | None, scale: float) -> Tensor:
    """What the estimator maximises, (B,) -> (B,): r, or -|r - target| (AlignProp / RLR aesthetic), times scale."""
    u = rewards if target is None else -(rewards - target).abs()
    return scale * u


def score(policy: Policy, reward: Reward, final_latents: Tensor, prompts: Sequence[str]) -> Tensor:
    """Decode x_0 (B,C,h,w) and score it -> (B,); checks the reward's shape once, here."""
    rewards = reward(policy.decode(final_latents), prompts)
    if rewards.shape != (len(prompts),):
        raise UserError(
            f"reward {type(reward).__name__} returned shape {tuple(rewards.shape)}, expected ({len(prompts)},)"
        )
    return rewards


def require_differentiable(reward: Reward, estimator: str) -> None:
    if not reward.differentiable:
        raise UserError(
            f"estimator={estimator} backpropagates through the reward, but reward "
            f"{type(reward).__name__} is not differentiable; use estimator=ddpo or a differentiable reward"
        )


def reward_metrics(rewards: Tensor) -> dict[str, float]:
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0}


def draw(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high] from the run's generator (keeps runs reproducible)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())
