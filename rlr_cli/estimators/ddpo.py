"""DDPO with parity to kvablack/ddpo-pytorch: per-prompt advantages, inner epochs, PPO clipping.

A buffered estimator (interfaces.BufferedEstimator): `collect` samples a batch (no grad), scores it,
turns rewards into advantages and lays out the whole schedule of the batch: `num_inner_epochs` passes,
each shuffling the samples and, independently per sample, the timesteps, cut into sub-batches of
`train_batch_size`, `grad_accum` sub-batches per optimizer step; each `update` is one optimizer step.
A sub-batch at one timestep slot is one denoiser call (its samples at their own transitions) and one
loss term, handed to backward at once, as ddpo-pytorch's per-timestep backward.

Parity: the loss of one term is mean_b max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), ratio =
exp(log p_new - log p_old), log p averaged over latent dims; a step's gradient is the mean of its
grad_accum * trained_timesteps terms (accelerate's accumulation). With clip_range None, one inner epoch,
advantages "leave_one_out", log_prob_reduce "sum" and timestep_reduce "sum" it is exactly the on-policy
likelihood-ratio estimator of -grad J (unbiased).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import (
    LossTerms,
    detached,
    leave_one_out_mean,
    require_kl_chain,
    require_stochastic,
    reward_metrics,
    score,
    select,
    state_advantages,
    utility,
)
from rlr_cli.interfaces import Backward, Chain, EstimatorOutput, Policy, Reward, Rollout, RunFacts
from rlr_cli.ranges import NonNegativeFloat, Positive, PositiveFloat
from rlr_cli.sampling import stochastic_steps


class PerPromptStatTracker:
    """ddpo-pytorch's tracker: a deque of rewards per prompt; batch statistics while it is short."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        prompts_array = np.array(prompts)
        out = np.empty_like(rewards)
        for prompt in np.unique(prompts_array):
            mine = rewards[prompts_array == prompt]
            history = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            history.extend(mine.tolist())
            pool = rewards if len(history) < self.min_count else np.array(history)
            out[prompts_array == prompt] = (mine - pool.mean()) / (pool.std() + 1e-6)
        return out

    def state_dict(self) -> dict:
        return {prompt: list(history) for prompt, history in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(h, maxlen=self.buffer_size) for p, h in state.items()}


@dataclass(frozen=True)
class Batch:
    """A collected batch: the trajectories, their rewards and advantages, and timesteps trained per sample."""

    rollout: Rollout
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,), or (B, T) with a state baseline: each transition's own
    trained: int


@dataclass(frozen=True)
class Update:
    """One optimizer step: sub-batches (sample indices (b,), their shuffled transitions (b, trained))."""

    batch: Batch
    sub_batches: list[tuple[Tensor, Tensor]]
    first: bool  # the batch's first step (logged as `sampled`)


class DDPO:
    """PPO-clipped likelihood ratio over stored trajectories (unbiased only on-policy, unclipped)."""

    def __init__(
        self,
        *,
        num_inner_epochs: Positive,
        train_batch_size: Positive,
        grad_accum: Positive,
        timestep_fraction: Annotated[float, Field(gt=0, le=1)],
        clip_range: Annotated[float, Field(gt=0)] | None,
        adv_clip_max: Annotated[float, Field(gt=0)],
        advantages: Literal["ddpo", "leave_one_out", "state"],
        per_prompt_stat_tracking: bool,
        stat_buffer_size: Positive,
        stat_min_count: Positive,
        log_prob_reduce: Literal["mean", "sum"],
        timestep_reduce: Literal["mean", "sum"],
        target: float | None,
        reward_scale: PositiveFloat,
        kl_beta: NonNegativeFloat,
    ):
        self.kl_beta = kl_beta
        self.num_inner_epochs, self.train_batch_size, self.grad_accum = num_inner_epochs, train_batch_size, grad_accum
        self.timestep_fraction, self.clip_range, self.adv_clip_max = timestep_fraction, clip_range, adv_clip_max
        self.advantage_mode, self.per_prompt_stat_tracking = advantages, per_prompt_stat_tracking
        self.log_prob_reduce, self.timestep_reduce = log_prob_reduce, timestep_reduce
        self.target, self.reward_scale = target, reward_scale
        self.tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        if run.grad_accum != 1:
            raise UserError("estimator=ddpo accumulates its own sub-batches (estimator.grad_accum): set "
                            "trainer.grad_accum=1")
        if run.batch_size % options["train_batch_size"]:
            raise UserError(f"estimator=ddpo: trainer.batch_size={run.batch_size} is not a multiple of "
                            f"estimator.train_batch_size={options['train_batch_size']}")
        require_stochastic(run, "ddpo")
        require_kl_chain(run, "ddpo", pathwise=False)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["stat_tracker"])

    # -- sampling ----------------------------------------------------------------------------------
    def _advantages(self, u: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.advantage_mode == "leave_one_out":
            return u - leave_one_out_mean(u, list(prompts))
        if self.per_prompt_stat_tracking:
            adv = torch.as_tensor(self.tracker.update(prompts, u.double().cpu().numpy()), dtype=u.dtype)
        else:
            adv = (u - u.mean()) / (u.std(unbiased=False) + 1e-8)  # numpy's ddof 0, as ddpo-pytorch
        return adv.to(u.device).clamp(-self.adv_clip_max, self.adv_clip_max)

    def collect(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator) -> list[Update]:
        state = self.advantage_mode == "state"
        rollout, rewards = sample_and_score(policy, reward, prompts, generator, keep_x0=state)
        u = utility(rewards, self.target, self.reward_scale)
        if state:  # every stochastic transition's own advantage (one decoder + reward pass each)
            steps = stochastic_steps(rollout.chain).tolist()
            per_step = state_advantages(policy, reward, rollout, u, steps, 1, self.target, self.reward_scale)
            advantages = torch.zeros(len(prompts), rollout.num_steps, dtype=u.dtype, device=u.device)
            for i, a in per_step.items():
                advantages[:, i] = a
        else:
            advantages = self._advantages(u, prompts)
        batch = Batch(rollout, rewards, advantages, trained_steps(rollout.chain, self.timestep_fraction))
        return plan(batch, generator, self.num_inner_epochs, self.train_batch_size, self.grad_accum)

    # -- training ----------------------------------------------------------------------------------
    def update(self, policy: Policy, reward: Reward, update: Update, backward: Backward) -> EstimatorOutput:
        return ppo_update(policy, update, backward, self.clip_range, self.log_prob_reduce, self.timestep_reduce,
                          self.kl_beta)


def sample_and_score(policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                     shared_start: int = 1, keep_x0: bool = False) -> tuple[Rollout, Tensor]:
    """Trajectories without gradients (their log-probabilities stored) and their rewards."""
    with torch.no_grad():
        rollout = detached(policy.sample(prompts, generator=generator, grad_steps=(), shared_start=shared_start,
                                         keep_x0=keep_x0))
        rewards = score(policy, reward, rollout.final, prompts).detach()
    return rollout, rewards


def trained_steps(chain: Chain, timestep_fraction: float) -> int:
    """How many of a sample's stochastic transitions one pass trains: int(n * fraction), at least one."""
    return max(1, int(len(stochastic_steps(chain)) * timestep_fraction))


def plan(batch: Batch, generator: torch.Generator, num_inner_epochs: int, train_batch_size: int,
         grad_accum: int) -> list[Update]:
    """The batch's schedule: inner epochs, each shuffling the samples and (per sample) the stochastic
    timesteps, cut into sub-batches, grad_accum of them per optimizer step."""
    b, stochastic = batch.rollout.latents.shape[0], stochastic_steps(batch.rollout.chain)
    sub_batches: list[tuple[Tensor, Tensor]] = []
    for _ in range(num_inner_epochs):
        order = torch.randperm(b, generator=generator)
        times = torch.stack([stochastic[torch.randperm(len(stochastic), generator=generator)[: batch.trained]]
                             for _ in range(b)])
        for s in range(0, b, train_batch_size):
            idx = order[s : s + train_batch_size]
            sub_batches.append((idx, times[idx]))
    groups = [sub_batches[s : s + grad_accum] for s in range(0, len(sub_batches), grad_accum)]
    return [Update(batch, group, first=n == 0) for n, group in enumerate(groups)]


def ppo_update(policy: Policy, update: Update, backward: Backward, clip_range: float | None,
               log_prob_reduce: str, timestep_reduce: str, kl_beta: float) -> EstimatorOutput:
    """One optimizer step of the PPO-clipped likelihood ratio over the update's sub-batches; with kl_beta,
    each term adds kl_beta * the KL to the reference at its transitions, reduced over latent dims as the
    log-probabilities are (Flow-GRPO's loss)."""
    batch = update.batch
    rollout, adv, trained = batch.rollout, batch.advantages, batch.trained
    dims, stochastic = rollout.latents[0, 0].numel(), len(stochastic_steps(rollout.chain))
    # accelerate's average over grad_accum * trained terms, or the estimator's sum over stochastic transitions
    per_term = 1.0 / len(update.sub_batches) / (trained if timestep_reduce == "mean" else trained / stochastic)
    terms = LossTerms(backward)
    kls, clipped, ratios, used, divergences = [], [], [], [], []
    for idx, times in update.sub_batches:
        used.append(idx)
        sub = select(rollout, idx)
        rows = torch.arange(len(idx))
        for slot in range(trained):
            steps = times[:, slot]  # each sample at its own transition: one denoiser call
            if kl_beta > 0:
                new, divergence = policy.step_log_prob_kl(sub, steps, reduce=log_prob_reduce)
            else:
                new, divergence = policy.step_log_prob(sub, steps, reduce=log_prob_reduce), None
            old = sub.log_probs[rows, steps].to(new) * (dims if log_prob_reduce == "sum" else 1)
            a = (adv[idx][rows, steps] if adv.dim() == 2 else adv[idx]).to(new)
            ratio = torch.exp(new - old)
            loss = -a * ratio
            if clip_range is not None:
                loss = torch.maximum(loss, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
                clipped.append(((ratio.detach() - 1).abs() > clip_range).float())
            if divergence is not None:
                loss = loss + kl_beta * divergence
                divergences.append(divergence.detach())
            terms.add(per_term * loss.mean())
            kls.append(0.5 * (new.detach() - old) ** 2)
            ratios.append(ratio.detach())
    used_samples = torch.cat(used)
    metrics = reward_metrics(batch.rewards) | {
        "approx_kl": torch.cat(kls).mean().item(),
        "clipfrac": torch.cat(clipped).mean().item() if clipped else 0.0,
        "sampled": float(update.first),
        "advantage_abs_mean": adv.abs().mean().item(),
        # on the batch's first update the policy is the one that sampled: 1 up to float rounding
        "ratio_deviation": (torch.cat(ratios) - 1).abs().max().item(),
    }
    if divergences:  # per transition, as reduced: x trained transitions for a trajectory's KL
        metrics["kl"] = torch.cat(divergences).mean().item()
    return EstimatorOutput(loss=terms.total, rewards=batch.rewards[used_samples], metrics=metrics)
