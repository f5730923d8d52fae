"""DDPO with parity to kvablack/ddpo-pytorch: per-prompt advantages, inner epochs, PPO clipping.

One call = one optimizer step. A call with an empty buffer samples a batch (no grad), scores it, turns
rewards into advantages and lays out the whole schedule of the batch: `num_inner_epochs` passes, each
shuffling the samples and, independently per sample, the timesteps, cut into sub-batches of
`train_batch_size`, `grad_accum` sub-batches per optimizer step. Later calls consume that schedule
(the prompts they are given are ignored until the buffer is empty again). Each (sub-batch, timestep)
term is differentiated at once (common.GradientSum): the graphs of one sub-batch at one timestep slot
alive at a time, as with ddpo-pytorch's per-timestep backward. The Policy protocol runs one transition
index per call, so a sub-batch whose samples sit at different timesteps takes one call per timestep.

Parity: the loss of one term is mean_b max(-A ratio, -A clip(ratio, 1 - c, 1 + c)), ratio =
exp(log p_new - log p_old), log p averaged over latent dims; a step's gradient is the mean of its
grad_accum * trained_timesteps terms (accelerate's accumulation). With clip_range None, one inner epoch,
advantages "leave_one_out", log_prob_reduce "sum" and timestep_reduce "sum" it is exactly the on-policy
likelihood-ratio estimator of -grad J (unbiased).
"""
from __future__ import annotations

from collections import deque
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import GradientSum, detached, leave_one_out_mean, reward_metrics, score, select, utility
from rlr_cli.interfaces import EstimatorOutput, Policy, Reward


class PerPromptStatTracker:
    """ddpo-pytorch's tracker: a deque of rewards per prompt; batch statistics while it is short."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        prompts = np.array(prompts)
        out = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            history = self.stats.setdefault(str(prompt), deque(maxlen=self.buffer_size))
            history.extend(mine.tolist())
            pool = rewards if len(history) < self.min_count else np.array(history)
            out[prompts == prompt] = (mine - pool.mean()) / (pool.std() + 1e-6)
        return out

    def state_dict(self) -> dict:
        return {prompt: list(history) for prompt, history in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: deque(h, maxlen=self.buffer_size) for p, h in state.items()}


class DDPO:
    """PPO-clipped likelihood ratio over stored trajectories (unbiased only on-policy, unclipped)."""

    def __init__(
        self,
        num_inner_epochs: int = 1,
        train_batch_size: int = 4,
        grad_accum: int = 4,
        timestep_fraction: float = 1.0,
        clip_range: float | None = 1e-4,
        adv_clip_max: float = 5.0,
        advantages: Literal["ddpo", "leave_one_out"] = "ddpo",
        per_prompt_stat_tracking: bool = True,
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        log_prob_reduce: Literal["mean", "sum"] = "mean",
        timestep_reduce: Literal["mean", "sum"] = "mean",
        target: float | None = None,
        reward_scale: float = 1.0,
    ):
        if num_inner_epochs < 1 or train_batch_size < 1 or grad_accum < 1 or not 0 < timestep_fraction <= 1:
            raise UserError(
                "estimator=ddpo needs num_inner_epochs, train_batch_size, grad_accum >= 1 and "
                f"0 < timestep_fraction <= 1 (got {num_inner_epochs}, {train_batch_size}, {grad_accum}, "
                f"{timestep_fraction})"
            )
        self.num_inner_epochs, self.train_batch_size, self.grad_accum = num_inner_epochs, train_batch_size, grad_accum
        self.timestep_fraction, self.clip_range, self.adv_clip_max = timestep_fraction, clip_range, adv_clip_max
        self.advantage_mode, self.per_prompt_stat_tracking = advantages, per_prompt_stat_tracking
        self.log_prob_reduce, self.timestep_reduce = log_prob_reduce, timestep_reduce
        self.target, self.reward_scale = target, reward_scale
        self.tracker = PerPromptStatTracker(stat_buffer_size, stat_min_count)
        self._buffer: dict | None = None
        self._schedule: list[list[tuple[Tensor, Tensor]]] = []

    @property
    def at_cycle_boundary(self) -> bool:
        """True when no sampled batch is pending: a checkpoint taken now resumes exactly."""
        return not self._schedule

    def state_dict(self) -> dict:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["stat_tracker"])
        self._buffer, self._schedule = None, []

    # -- sampling ----------------------------------------------------------------------------------
    def _advantages(self, u: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.advantage_mode == "leave_one_out":
            return u - leave_one_out_mean(u, list(prompts))
        if self.per_prompt_stat_tracking:
            adv = torch.as_tensor(self.tracker.update(prompts, u.double().cpu().numpy()), dtype=u.dtype)
        else:
            adv = (u - u.mean()) / (u.std() + 1e-8)
        return adv.to(u.device).clamp(-self.adv_clip_max, self.adv_clip_max)

    def _sample(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator) -> None:
        with torch.no_grad():
            rollout = detached(policy.sample(prompts, generator=generator, grad_steps=()))
            rewards = score(policy, reward, rollout.final, prompts).detach()
        u = utility(rewards, self.target, self.reward_scale)
        b, t = len(prompts), policy.num_steps
        trained = max(1, int(t * self.timestep_fraction))
        self._buffer = {"rollout": rollout, "rewards": rewards, "advantages": self._advantages(u, prompts), "trained": trained}
        steps: list[tuple[Tensor, Tensor]] = []
        for _ in range(self.num_inner_epochs):
            order = torch.randperm(b, generator=generator)
            times = torch.stack([torch.randperm(t, generator=generator)[:trained] for _ in range(b)])
            for s in range(0, b, self.train_batch_size):
                idx = order[s : s + self.train_batch_size]
                steps.append((idx, times[idx]))
        self._schedule = [steps[s : s + self.grad_accum] for s in range(0, len(steps), self.grad_accum)]

    # -- training ----------------------------------------------------------------------------------
    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator):
        sampled = not self._schedule
        if sampled:
            self._sample(policy, reward, prompts, generator)
        buffer, group = self._buffer, self._schedule.pop(0)
        rollout, adv, trained = buffer["rollout"], buffer["advantages"], buffer["trained"]
        dims = rollout.latents[0, 0].numel()
        # accelerate's average over grad_accum * trained terms, or the estimator's sum over transitions
        per_term = 1.0 / len(group) / (trained if self.timestep_reduce == "mean" else trained / policy.num_steps)
        grads = GradientSum(policy.trainable_parameters())
        kls, clipped, used = [], [], []
        for idx, times in group:
            used.append(idx)
            for slot in range(trained):
                # one term per (sub-batch, slot): the sub-batch's UNet calls, split by timestep
                term = 0.0
                for i in times[:, slot].unique().tolist():
                    members = idx[times[:, slot] == i]
                    sub = select(rollout, members)
                    new = policy.step_log_prob(sub, i, reduce=self.log_prob_reduce)
                    old = sub.log_probs[:, i].to(new) * (dims if self.log_prob_reduce == "sum" else 1)
                    a = adv[members].to(new)
                    ratio = torch.exp(new - old)
                    loss = -a * ratio
                    if self.clip_range is not None:
                        loss = torch.maximum(loss, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
                        clipped.append(((ratio.detach() - 1).abs() > self.clip_range).float())
                    term = term + per_term * loss.sum() / len(idx)  # its share of mean_b over the sub-batch
                    kls.append(0.5 * (new.detach() - old) ** 2)
                grads.add(term)
        used = torch.cat(used)
        metrics = reward_metrics(buffer["rewards"]) | {
            "approx_kl": torch.cat(kls).mean().item(),
            "clipfrac": torch.cat(clipped).mean().item() if clipped else 0.0,
            "sampled": float(sampled),
            "advantage_abs_mean": adv.abs().mean().item(),
        }
        return EstimatorOutput(loss=grads.loss(adv.new_zeros(())), rewards=buffer["rewards"][used], metrics=metrics)
