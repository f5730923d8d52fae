"""Helpers shared by the estimators: the objective applied to raw rewards, and reward evaluation."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Policy, Reward, Rollout


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


def gaussian_log_density(x: Tensor, mean: Tensor, std: float) -> Tensor:
    """log N(x; mean, std^2 I) summed over all non-batch dims, (B,...) -> (B,); x is treated as data."""
    if std <= 0:
        raise ValueError("the log-density of a deterministic transition (std = 0) is undefined")
    z = (x.detach() - mean) / std
    per_dim = -0.5 * z**2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    return per_dim.flatten(1).sum(dim=1)


def leave_one_out_mean(values: Tensor, groups: Sequence[str] | None) -> Tensor:
    """(B,) -> (B,): mean of the other samples of the same group (whole batch when groups is None).

    A sample alone in its group falls back to the leave-one-out mean of the batch, and to 0 when B = 1,
    so the baseline never depends on the sample itself (the estimate stays unbiased).
    """
    b = values.shape[0]
    batch = (values.sum() - values) / max(b - 1, 1) if b > 1 else torch.zeros_like(values)
    if groups is None:
        return batch
    out = batch.clone()
    for group in set(groups):
        idx = torch.tensor([k for k, g in enumerate(groups) if g == group], device=values.device)
        if idx.numel() > 1:
            members = values[idx]
            out[idx] = (members.sum() - members) / (idx.numel() - 1)
    return out


Baseline = Literal["leave_one_out_prompt", "leave_one_out_batch", "batch_mean", "none"]


def advantages(u: Tensor, prompts: Sequence[str], baseline: Baseline, scale_by_std: bool) -> Tensor:
    """Detached (B,) advantages u - b; the two leave-one-out baselines keep likelihood ratios unbiased.

    batch_mean includes the sample itself (O(1/B) bias); scale_by_std divides by the batch std (rescales).
    """
    u = u.detach()
    if baseline == "leave_one_out_prompt":
        a = u - leave_one_out_mean(u, list(prompts))
    elif baseline == "leave_one_out_batch":
        a = u - leave_one_out_mean(u, None)
    elif baseline == "batch_mean":
        a = u - u.mean()
    elif baseline == "none":
        a = u.clone()
    else:
        raise ValueError(f"unknown baseline {baseline!r}")
    if scale_by_std and u.numel() > 1:
        a = a / (u.std() + 1e-8)
    return a


class GradientSum:
    """Differentiates loss terms one at a time and folds them into one surrogate loss.

    Each `add(term)` frees the term's graph at once (torch.autograd.grad), so memory does not grow with
    the number of terms; `loss()` returns a scalar whose value is the sum of the terms and whose gradient
    w.r.t. the parameters is the sum of their gradients: value + (g.detach() * p).sum() - its own value.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.value = 0.0

    def add(self, term: Tensor) -> None:
        grads = torch.autograd.grad(term, self.params, allow_unused=True)
        for acc, g in zip(self.grads, grads):
            if g is not None:
                acc.add_(g)
        self.value += term.item()

    def add_gradient(self, grads: Sequence[Tensor], value: float = 0.0) -> None:
        for acc, g in zip(self.grads, grads):
            acc.add_(g)
        self.value += value

    def loss(self, reference: Tensor) -> Tensor:
        """The folded surrogate, on the device/dtype of `reference` (a scalar)."""
        surrogate = sum((g.detach() * p).sum() for g, p in zip(self.grads, self.params))
        if not torch.is_tensor(surrogate):
            return reference.new_tensor(self.value)
        return (surrogate - surrogate.detach()).to(reference.dtype) + self.value


def select(rollout: Rollout, idx: Tensor) -> Rollout:
    """The rollout of samples idx (K,): indexes every tensor whose first dim is B, in cond too.

    cond may be a tensor, or a tuple / list / dict / dataclass of them; tensors with another first dim
    (e.g. a shared unconditional embedding of batch 1) are kept as they are.
    """
    b = rollout.latents.shape[0]

    def pick(obj):
        if torch.is_tensor(obj):
            return obj[idx.to(obj.device)] if obj.dim() > 0 and obj.shape[0] == b else obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(pick(o) for o in obj)
        if isinstance(obj, dict):
            return {k: pick(v) for k, v in obj.items()}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return dataclasses.replace(obj, **{f.name: pick(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
        return obj

    return dataclasses.replace(
        rollout,
        latents=rollout.latents[idx],
        noises=rollout.noises[idx],
        log_probs=rollout.log_probs[idx],
        cond=pick(rollout.cond),
        prompts=[rollout.prompts[k] for k in idx.tolist()],
    )


def detached(rollout: Rollout) -> Rollout:
    """The rollout without autograd history (for buffers kept across calls)."""
    return dataclasses.replace(rollout, latents=rollout.latents.detach(), noises=rollout.noises.detach())


def randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like x, drawn from the (CPU) run generator, on x's device/dtype."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
