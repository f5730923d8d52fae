"""Helpers shared by the estimators: the objective applied to raw rewards, scoring, baselines, checks."""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Backward, Policy, Reward, Rollout, RunFacts
from rlr_cli.sampling import map_batch


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


def require_differentiable(run: RunFacts, estimator: str, why: str = "backpropagates through the reward") -> None:
    """The validation pass: a pathwise estimator needs a differentiable reward."""
    if not run.reward_differentiable:
        raise UserError(f"estimator={estimator} {why}, but the reward is not differentiable; "
                        "use estimator=ddpo or a differentiable reward")


def require_stochastic(run: RunFacts, estimator: str) -> None:
    """The validation pass: likelihood-ratio terms need a stochastic chain (the log-density of a
    deterministic step is undefined)."""
    if run.eta <= 0:
        raise UserError(f"estimator={estimator} has likelihood-ratio terms, which need a stochastic chain: "
                        f"model.eta={run.eta} makes every step deterministic; set model.eta > 0 (DDPO: 1.0)")


KL_ESTIMATORS = ("full_bp", "truncated_bp", "ddpo", "grpo")


def require_no_kl(run: RunFacts, estimator: str) -> None:
    """The validation pass: regularizer.kl_beta > 0 only with an estimator that adds the KL term."""
    if run.kl_beta > 0:
        raise UserError(f"regularizer.kl_beta={run.kl_beta}: estimator={estimator} does not add the KL term yet; "
                        f"use one that does ({', '.join(KL_ESTIMATORS)}) or regularizer.kl_beta=0")


def require_kl_chain(run: RunFacts, estimator: str, pathwise: bool = True) -> None:
    """The KL between two transitions with std 0 is undefined: kl_beta > 0 needs a stochastic chain (for a
    pathwise estimator, stochastic at every step: its KL terms are on all the steps it differentiates)."""
    if run.kl_beta > 0 and run.eta <= 0:
        raise UserError(f"regularizer.kl_beta={run.kl_beta} with estimator={estimator} needs a stochastic chain "
                        f"(the per-step KL divides by the step's std): model.eta={run.eta}; set model.eta > 0")
    if run.kl_beta > 0 and pathwise and run.sde_window:
        raise UserError(f"regularizer.kl_beta={run.kl_beta} with estimator={estimator} needs the SDE on every step "
                        "it differentiates (the KL of an ODE step is undefined): set model.sde_window=null")


def require_sde_everywhere(run: RunFacts, estimator: str) -> None:
    """Likelihood-ratio terms at every step need every step stochastic: no SDE window."""
    if run.sde_window:
        raise UserError(f"estimator={estimator} has likelihood-ratio terms on every step, but model.sde_window "
                        "samples the ODE outside it; set model.sde_window=null (ddpo and grpo train inside a window)")


def reward_metrics(rewards: Tensor) -> dict[str, float]:
    return {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0}


def draw(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in [low, high] from the run's generator (keeps runs reproducible)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


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


def select(rollout: Rollout, idx: Tensor) -> Rollout:
    """The rollout of samples idx (K,): indexes every tensor whose first dim is B, in cond too.

    cond may be a tensor, or a tuple / list / dict / dataclass of them; tensors with another first dim
    (e.g. a shared unconditional embedding of batch 1) are kept as they are.
    """
    b = rollout.latents.shape[0]
    return dataclasses.replace(
        rollout,
        latents=rollout.latents[idx],
        noises=rollout.noises[idx],
        log_probs=rollout.log_probs[idx],
        cond=map_batch([rollout.cond], lambda tensors: tensors[0][idx.to(tensors[0].device)], b),
        prompts=[rollout.prompts[k] for k in idx.tolist()],
        x0_predictions=None if rollout.x0_predictions is None else rollout.x0_predictions[idx],
    )


def detached(rollout: Rollout) -> Rollout:
    """The rollout without autograd history (for buffers kept across calls)."""
    return dataclasses.replace(rollout, latents=rollout.latents.detach(), noises=rollout.noises.detach())


def randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like x, drawn from the (CPU) run generator, on x's device/dtype."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


class LossTerms:
    """Hands each loss term to the trainer's backward at once (its graph is freed) and sums their values."""

    def __init__(self, backward: Backward):
        self.backward, self.total = backward, 0.0

    def add(self, term: Tensor) -> None:
        self.backward(term)
        self.total += float(term.detach())


def state_advantages(policy: Policy, reward: Reward, rollout: Rollout, u: Tensor, steps: Sequence[int], every: int,
                     target: float | None, reward_scale: float) -> dict[int, Tensor]:
    """The state baseline's (B,) advantage of each transition i in steps: U - b(x_i), b the utility of the
    rollout's own x_0 prediction from x_i (which depends only on the state before step i's noise), minus
    the leave-one-out mean of that residual over the prompt's other samples. b is scored at every every-th
    transition (one decoder + reward pass of batch B each, no grad) and reused until the next."""
    assert rollout.x0_predictions is not None, "the policy's rollouts carry no x0 predictions (sample(keep_x0=True))"
    out = {}
    for anchor in sorted({i - i % every for i in steps}):
        with torch.no_grad():
            value = utility(score(policy, reward, rollout.x0_predictions[:, anchor], rollout.prompts), target, reward_scale)
        residual = u.detach() - value
        out[anchor] = residual - leave_one_out_mean(residual, rollout.prompts)
    return {i: out[i - i % every] for i in steps}
