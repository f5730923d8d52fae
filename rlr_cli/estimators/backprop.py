"""Pathwise estimators: full backprop through the chain, truncated backprop (DRaFT-K / AlignProp),
DRaFT-LV and ReFL.

Steps outside `grad_steps` run their UNet call without grad, but the sampler's linear update still
carries the gradient of later steps through x (as AlignProp's `noise_pred.detach()` does).
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field

from rlr_cli.estimators.common import (
    LossTerms,
    draw,
    randn_like,
    require_differentiable,
    require_kl_chain,
    require_no_kl,
    reward_metrics,
    score,
    utility,
)
from rlr_cli.interfaces import Backward, EstimatorOutput, Graph, Policy, Reward, Rollout, RunFacts
from rlr_cli.ranges import NonNegativeFloat, Positive, PositiveFloat
from rlr_cli.sampling import as_steps


def _pathwise(policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
              backward: Backward, grad_steps: list[int], target: float | None, reward_scale: float,
              kl_beta: float) -> EstimatorOutput:
    """-U.mean(), plus kl_beta * the KL to the reference summed over the grad steps (in U's units)."""
    rollout = policy.sample(prompts, generator=generator, grad_steps=grad_steps, kl=kl_beta > 0)
    rewards = score(policy, reward, rollout.final, prompts)
    terms = LossTerms(backward)
    loss = -utility(rewards, target, reward_scale).mean()
    metrics = reward_metrics(rewards) | {"grad_steps": float(len(grad_steps))}
    if rollout.kl is not None:
        loss = loss + kl_beta * rollout.kl.mean()
        metrics["kl"] = rollout.kl.mean().item()
    terms.add(loss)
    return EstimatorOutput(loss=terms.total, rewards=rewards.detach(), metrics=metrics)


class FullBackprop:
    """Pathwise gradient through every transition (unbiased; memory bounded by checkpointing)."""

    def __init__(self, *, target: float | None, reward_scale: PositiveFloat, kl_beta: NonNegativeFloat):
        self.target, self.reward_scale, self.kl_beta = target, reward_scale, kl_beta

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_differentiable(run, "full_bp")
        require_kl_chain(run, "full_bp")

    def graphs(self, num_steps: int) -> list[Graph]:
        return [Graph("the chain", num_steps, reward=True)]

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        steps = list(range(policy.num_steps))
        return _pathwise(policy, reward, prompts, generator, backward, steps, self.target, self.reward_scale,
                         self.kl_beta)


class TruncatedBackprop:
    """Pathwise gradient through the last K transitions only (biased: drops the earlier ones).

    mode fixed: K = k. random_per_trajectory: K drawn once per batch (AlignProp). random_per_step: each
    transition i kept on its own draw of K when i >= T - K (old AlignProp / trl).
    """

    def __init__(
        self,
        *,
        mode: Literal["fixed", "random_per_trajectory", "random_per_step"],
        k: Positive,
        distribution: Literal["gaussian", "uniform"],
        k_mean: NonNegativeFloat,
        k_std: Annotated[float, Field(ge=0)],
        k_min: Positive,
        k_max: Positive,
        target: float | None,
        reward_scale: PositiveFloat,
        kl_beta: NonNegativeFloat,
    ):
        self.mode, self.k, self.distribution = mode, k, distribution
        self.k_mean, self.k_std, self.k_min, self.k_max = k_mean, k_std, k_min, k_max
        self.target, self.reward_scale, self.kl_beta = target, reward_scale, kl_beta

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_differentiable(run, "truncated_bp")
        require_kl_chain(run, "truncated_bp")

    def graphs(self, num_steps: int) -> list[Graph]:
        """The longest truncation this mode can draw."""
        k = self.k if self.mode == "fixed" else num_steps if self.distribution == "gaussian" else self.k_max
        return [Graph("the last K", min(k, num_steps), reward=True)]

    def _draw_k(self, generator: torch.Generator, num_steps: int) -> int:
        """uniform: K in [k_min, k_max], at most T. gaussian: AlignProp's rule (sd_pipeline.py): the stop step
        int(N(T - k_mean, k_std)) is redrawn until it lies in [1, T - 1]; K = T - stop."""
        if self.distribution == "uniform":
            return min(max(draw(generator, self.k_min, self.k_max), 1), num_steps)
        if num_steps < 2:  # no stop step to draw: the whole (one-step) chain
            return num_steps
        stop = -1
        while not 1 <= stop <= num_steps - 1:
            stop = int(num_steps - self.k_mean + self.k_std * torch.randn(1, generator=generator).item())
        return num_steps - stop

    def grad_steps(self, generator: torch.Generator, num_steps: int) -> list[int]:
        if self.mode == "fixed":
            k = min(self.k, num_steps)
            return list(range(num_steps - k, num_steps))
        if self.mode == "random_per_trajectory":
            k = self._draw_k(generator, num_steps)
            return list(range(num_steps - k, num_steps))
        return [i for i in range(num_steps) if i >= num_steps - self._draw_k(generator, num_steps)]

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        steps = self.grad_steps(generator, policy.num_steps)
        return _pathwise(policy, reward, prompts, generator, backward, steps, self.target, self.reward_scale,
                         self.kl_beta)


class DraftLV:
    """DRaFT-LV (Clark et al. 2024, the K = 1 case): sample x_0 without grad, then n times re-noise it to
    the last transition's input by the forward process, x_1 = sqrt(a_1) x_0 + sqrt(1 - a_1) eps, and run
    the last transition from there with grad; the loss averages the n rewards.

    Pathwise through the last step only (biased like DRaFT-1). Averaging n re-noisings of one x_0 removes
    the share 1 - 1/n of the variance the re-noising adds; the variance across x_0 stays (BENCHMARKS.md).
    Cost: n UNet calls with grad, n decodes.
    """

    def __init__(self, *, n: Positive, target: float | None, reward_scale: PositiveFloat):
        self.n, self.target, self.reward_scale = n, target, reward_scale

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_differentiable(run, "draft_lv")
        require_no_kl(run, "draft_lv")

    def graphs(self, num_steps: int) -> list[Graph]:
        return [Graph("one late step", 1, reward=True)]

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        with torch.no_grad():
            rollout = policy.sample(prompts, generator=generator, grad_steps=())
        return self.renoised(policy, reward, rollout, generator, backward)

    def renoised(self, policy: Policy, reward: Reward, rollout: Rollout, generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        """The estimate from a sampled rollout (the diagnostics hold one fixed to measure the re-noising's share)."""
        last, prompts = policy.num_steps - 1, rollout.prompts
        x0, steps = rollout.final.detach(), as_steps(last, len(prompts))
        terms, rewards = LossTerms(backward), []
        for _ in range(self.n):  # each draw's graph is freed by its backward before the next is built
            x1 = rollout.chain.noised(steps, x0, randn_like(x0, generator))
            sample = policy.transition(rollout, last, x1, noise=randn_like(x0, generator)).sample
            r = score(policy, reward, sample, prompts)
            terms.add(-utility(r, self.target, self.reward_scale).mean() / self.n)
            rewards.append(r.detach())
        mean_rewards = torch.stack(rewards).mean(dim=0)
        metrics = reward_metrics(mean_rewards) | {"draws": float(self.n)}
        return EstimatorOutput(loss=terms.total, rewards=mean_rewards, metrics=metrics)


class ReFL:
    """ImageReward's ReFL: sample without grad, stop at a random late transition s, predict x_0 from
    its input in one step with grad, loss grad_scale * relu(target - r) (biased).

    s is uniform over the last `last_steps` transitions (ImageReward: 40 steps, s in [30, 39]). The
    policy samples the whole chain (the protocol has no early stop): up to last_steps no-grad calls wasted.
    """

    def __init__(self, *, last_steps: Positive, target: float, grad_scale: PositiveFloat):
        self.last_steps, self.target, self.grad_scale = last_steps, target, grad_scale

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_differentiable(run, "refl")
        require_no_kl(run, "refl")

    def graphs(self, num_steps: int) -> list[Graph]:
        return [Graph("one late step", 1, reward=True)]

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        t = policy.num_steps
        stop = draw(generator, max(t - self.last_steps, 0), t - 1)
        with torch.no_grad():
            rollout = policy.sample(prompts, generator=generator, grad_steps=())
        x0 = policy.predict_x0(rollout, stop, rollout.latents[:, stop].detach())
        rewards = score(policy, reward, x0, prompts)
        terms = LossTerms(backward)
        terms.add(self.grad_scale * torch.relu(self.target - rewards).mean())
        metrics = reward_metrics(rewards) | {"stop_step": float(stop)}
        return EstimatorOutput(loss=terms.total, rewards=rewards.detach(), metrics=metrics)
