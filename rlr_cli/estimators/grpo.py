"""GRPO as Flow-GRPO (yifan123/flow_grpo) and DanceGRPO run it, on any stochastic chain.

A buffered estimator like DDPO, with one difference in what is collected: each batch is
trainer.batch_size / group_size prompts, each sampled group_size times, and a sample's advantage is
its reward relative to its own group: (r - group mean) / (std + 1e-4), std per group, over the whole
batch or 1 (`std`), clipped to +-adv_clip_max. Training is DDPO's PPO update: inner epochs, a random
subset of int(T * timestep_fraction) transitions per sample, clipped ratio, log-probabilities averaged
over latent dims and terms averaged over trained transitions (Flow-GRPO's conventions).

The group-relative advantage with a std is the published recipe, not an unbiased estimator of grad J
(dividing by the group's own std couples the samples); std=none with one inner epoch and clip_range
null (and adv_clip_max large) is the on-policy likelihood ratio with a group-mean baseline: (G - 1) / G of
grad J over dims * T (tests/statistical).
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import require_kl_chain, require_stochastic, utility
from rlr_cli.estimators.ddpo import Batch, Update, plan, ppo_update, sample_and_score, trained_steps
from rlr_cli.interfaces import Backward, EstimatorOutput, Policy, Reward, RunFacts
from rlr_cli.ranges import NonNegativeFloat, Positive, PositiveFloat

STD_EPS = 1e-4  # Flow-GRPO's PerPromptStatTracker


class GRPO:
    """Group-relative PPO over stored trajectories (the flow-era RL recipe)."""

    def __init__(
        self,
        *,
        group_size: Annotated[int, Field(ge=2)],
        same_noise: bool,
        std: Literal["group", "global", "none"],
        num_inner_epochs: Positive,
        train_batch_size: Positive,
        grad_accum: Positive,
        timestep_fraction: Annotated[float, Field(gt=0, le=1)],
        clip_range: PositiveFloat | None,
        adv_clip_max: PositiveFloat,
        target: float | None,
        reward_scale: PositiveFloat,
        kl_beta: NonNegativeFloat,
    ):
        self.group_size, self.same_noise, self.std, self.kl_beta = group_size, same_noise, std, kl_beta
        self.num_inner_epochs, self.train_batch_size, self.grad_accum = num_inner_epochs, train_batch_size, grad_accum
        self.timestep_fraction, self.clip_range, self.adv_clip_max = timestep_fraction, clip_range, adv_clip_max
        self.target, self.reward_scale = target, reward_scale

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        """The group arithmetic, before any weight loads."""
        g, b, sub = options["group_size"], run.batch_size, options["train_batch_size"]
        if b % g:
            raise UserError(f"estimator=grpo: trainer.batch_size={b} is not a multiple of estimator.group_size={g} "
                            f"(each batch is trainer.batch_size / group_size prompts, group_size samples each)")
        if run.grad_accum != 1:
            raise UserError("estimator=grpo accumulates its own sub-batches (estimator.grad_accum): set "
                            "trainer.grad_accum=1")
        if b % sub:
            raise UserError(f"estimator=grpo: trainer.batch_size={b} is not a multiple of "
                            f"estimator.train_batch_size={sub}")
        require_stochastic(run, "grpo")
        require_kl_chain(run, "grpo", pathwise=False)

    def groups(self, prompts: Sequence[str]) -> list[str]:
        """The batch's prompts: the first len / group_size drawn, each repeated group_size times."""
        return [p for p in prompts[: len(prompts) // self.group_size] for _ in range(self.group_size)]

    def advantages(self, u: Tensor) -> Tensor:
        """(B,) utilities in consecutive groups -> group-relative advantages, clipped."""
        grouped = u.view(-1, self.group_size)
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        if self.std == "group":
            centred = centred / (grouped.std(dim=1, unbiased=False, keepdim=True) + STD_EPS)
        elif self.std == "global":
            centred = centred / (u.std(unbiased=False) + STD_EPS)
        return centred.flatten().clamp(-self.adv_clip_max, self.adv_clip_max)

    def collect(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator) -> list[Update]:
        prompts = self.groups(prompts)
        rollout, rewards = sample_and_score(policy, reward, prompts, generator,
                                            shared_start=self.group_size if self.same_noise else 1)
        advantages = self.advantages(utility(rewards, self.target, self.reward_scale))
        batch = Batch(rollout, rewards, advantages, trained_steps(rollout.chain, self.timestep_fraction))
        return plan(batch, generator, self.num_inner_epochs, self.train_batch_size, self.grad_accum)

    def update(self, policy: Policy, reward: Reward, update: Update, backward: Backward) -> EstimatorOutput:
        return ppo_update(policy, update, backward, self.clip_range, log_prob_reduce="mean", timestep_reduce="mean",
                          kl_beta=self.kl_beta)
