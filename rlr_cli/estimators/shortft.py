"""ShortFT (Guo et al., ICCV 2025, arXiv 2507.22604): full backprop through a short chain of a few-step model.

During training rollouts a frozen, trajectory-preserving few-step LoRA (the "shortcut") is active beside
the policy's trainable LoRA, and the chain is the shortcut's k-step chain; the reward gradient flows
through every step (one checkpoint per UNet call), the decoder and the reward into the trainable LoRA of
the base model. Evaluation and the saved adapter use the base model's own long chain without the
shortcut. This is a reading of the paper (its code is unreleased); see docs/shortft.md.

The gradient is taken inside the estimator while the shortcut is active (a checkpointed UNet call
recomputes in backward and must see the same adapters), and handed to the trainer as a surrogate loss.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import GradientSum, require_differentiable, reward_metrics, score, utility
from rlr_cli.interfaces import EstimatorOutput, Policy, Reward
from rlr_cli.shortcut import SHORTCUT_ADAPTER, ShortcutChain, load_shortcut_state


class ShortFT:
    """Pathwise gradient through the k steps of a frozen shortcut LoRA (+ optional long-chain tail)."""

    def __init__(
        self,
        k: int = 4,
        timesteps: str | list[int] = "even",
        scheduler: Literal["ddim", "tcd", "lcm"] = "ddim",
        gamma: float = 0.0,
        guidance_scale: float | None = None,
        long_steps: int = 0,
        shortcut_path: str | None = None,
        shortcut_hub_id: str | None = None,
        shortcut_weight_name: str | None = None,
        shortcut_scale: float = 1.0,
        cache_dir: str | None = None,
        target: float | None = None,
        reward_scale: float = 1.0,
    ):
        if not 1 <= k <= 50:
            raise UserError(f"estimator.k={k}: the shortcut chain needs 1 to 50 steps (ShortFT: 2-8)")
        self.k, self.timesteps, self.rule, self.gamma = k, timesteps, scheduler, gamma
        self.guidance_scale, self.long_steps, self.scale = guidance_scale, long_steps, shortcut_scale
        self.target, self.reward_scale = target, reward_scale
        # Weights load when built: a missing file or an offline hub stops the run before any work.
        self.state, self.alphas, self.metadata = load_shortcut_state(
            shortcut_path, shortcut_hub_id, shortcut_weight_name, cache_dir
        )
        self._attached_to = None
        self._chain = None

    def attach(self, policy: Policy) -> ShortcutChain:
        """Load the shortcut into the policy's UNet (once) and build the short chain."""
        if self._attached_to is not policy:
            if not hasattr(policy, "sampling_with"):
                raise UserError(f"estimator=shortft needs a policy with a frozen-adapter slot, not {type(policy).__name__}")
            try:
                policy.add_frozen_adapter(SHORTCUT_ADAPTER, self.state, self.alphas, self.metadata, self.scale)
            except (ValueError, RuntimeError, KeyError) as error:
                raise UserError(f"estimator=shortft: the shortcut LoRA does not fit this model's UNet "
                                f"({str(error).strip().splitlines()[0][:200]}); a shortcut belongs to one base "
                                f"model (model=tiny: estimator=shortft_tiny)") from None
            self._chain = ShortcutChain(
                policy.chain, self.k, self.rule, self.timesteps, self.gamma, self.long_steps,
                scheduler_config=policy.scheduler.config,
            )
            self._attached_to = policy
        return self._chain

    def adapters_at(self, i: int) -> tuple[str, ...]:
        return (SHORTCUT_ADAPTER,) if self._chain.is_shortcut(i) else ()

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator):
        require_differentiable(reward, "shortft")
        chain = self.attach(policy)
        grads = GradientSum(policy.trainable_parameters())
        with policy.sampling_with(chain, self.adapters_at, self.guidance_scale):
            rollout = policy.sample(prompts, generator=generator, grad_steps=range(chain.num_steps))
            rewards = score(policy, reward, rollout.final, prompts)
            objective = -utility(rewards, self.target, self.reward_scale).mean()
            grads.add(objective)  # backward here, while the shortcut is active
        metrics = reward_metrics(rewards) | {"shortcut_steps": float(self.k), "long_steps": float(self.long_steps)}
        return EstimatorOutput(loss=grads.loss(objective.detach()), rewards=rewards.detach(), metrics=metrics)
