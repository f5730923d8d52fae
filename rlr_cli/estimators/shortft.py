"""ShortFT (Guo et al., ICCV 2025, arXiv 2507.22604): full backprop through a short chain of a few-step model.

During training rollouts a frozen, trajectory-preserving few-step LoRA (the "shortcut") is active beside
the policy's trainable LoRA, and the chain is the shortcut's k-step chain; the reward gradient flows
through every step (one checkpoint per UNet call), the decoder and the reward into the trainable LoRA of
the base model. Evaluation and the saved adapter use the base model's own long chain without the
shortcut. This is a reading of the paper (its code is unreleased); see docs/shortft.md.

The shortcut chain is passed to the policy's `sample`; each of its denoiser calls activates the
adapters of its step, also when recomputed in backward, so the trainer's backward can run anywhere.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import LossTerms, require_differentiable, require_no_kl, reward_metrics, score, utility
from rlr_cli.interfaces import AdapterPolicy, Backward, EstimatorOutput, Reward, RunFacts
from rlr_cli.ranges import NonNegativeFloat, PositiveFloat
from rlr_cli.sampling import DDIMChain
from rlr_cli.shortcut import SHORTCUT_ADAPTER, ShortcutChain, load_shortcut_state


class ShortFT:
    """Pathwise gradient through the k steps of a frozen shortcut LoRA (+ optional long-chain tail)."""

    def __init__(
        self,
        *,
        k: Annotated[int, Field(ge=1, le=50)],
        timesteps: str | list[int],
        scheduler: Literal["ddim", "tcd", "lcm"],
        gamma: Annotated[float, Field(ge=0, le=1)],
        guidance_scale: NonNegativeFloat | None,
        long_steps: Annotated[int, Field(ge=0)],
        shortcut_path: str | None,
        shortcut_hub_id: str | None,
        shortcut_weight_name: str | None,
        shortcut_scale: PositiveFloat,
        cache_dir: str | None,
        target: float | None,
        reward_scale: PositiveFloat,
    ):
        self.k, self.timesteps, self.gamma = k, timesteps, gamma
        self.rule: Literal["ddim", "tcd", "lcm"] = scheduler
        self.guidance_scale, self.long_steps, self.scale = guidance_scale, long_steps, shortcut_scale
        self.target, self.reward_scale = target, reward_scale
        # Weights load when built: a missing file or an offline hub stops the run before any work.
        self.state, self.alphas, self.metadata = load_shortcut_state(
            shortcut_path, shortcut_hub_id, shortcut_weight_name, cache_dir
        )
        self._attached_to: AdapterPolicy | None = None
        self._chain: ShortcutChain | None = None

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_differentiable(run, "shortft")
        if run.sampler != "ddim":
            raise UserError(f"estimator=shortft needs a DDIM model (SD 1.x, SDXL): its shortcuts (LCM, TCD, Hyper-SD "
                            f"LoRAs) shorten a DDIM chain, and this model samples a {run.sampler} chain; a flow model "
                            "samples few steps itself (model.num_steps=4 with truncated_bp or full_bp)")
        require_no_kl(run, "shortft")
        if not run.lora:
            raise UserError("estimator=shortft keeps its shortcut as a frozen LoRA beside the trainable one: "
                            "the model needs model.lora (full fine-tuning is not supported)")

    def attach(self, policy: AdapterPolicy) -> ShortcutChain:
        """Load the shortcut into the policy's denoiser (once) and build the short chain."""
        if self._attached_to is not policy or self._chain is None:
            try:
                policy.add_frozen_adapter(SHORTCUT_ADAPTER, self.state, self.alphas, self.metadata, self.scale)
            except (ValueError, RuntimeError, KeyError) as error:
                raise UserError(f"estimator=shortft: the shortcut LoRA does not fit this model's UNet "
                                f"({str(error).strip().splitlines()[0][:200]}); a shortcut belongs to one base "
                                f"model (model=tiny: estimator=shortft_tiny)") from None
            if not isinstance(policy.chain, DDIMChain):
                raise UserError(f"estimator=shortft runs on a DDIM model chain, not {type(policy.chain).__name__}")
            self._chain = ShortcutChain(
                policy.chain, self.k, self.rule, self.timesteps, self.gamma, self.long_steps,
                scheduler_config=policy.scheduler_config, guidance_scale=self.guidance_scale,
            )
            self._attached_to = policy
        return self._chain

    def __call__(self, policy: AdapterPolicy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        chain = self.attach(policy)
        rollout = policy.sample(prompts, generator=generator, grad_steps=range(chain.num_steps), chain=chain)
        rewards = score(policy, reward, rollout.final, prompts)
        terms = LossTerms(backward)
        terms.add(-utility(rewards, self.target, self.reward_scale).mean())
        metrics = reward_metrics(rewards) | {"shortcut_steps": float(self.k), "long_steps": float(self.long_steps)}
        return EstimatorOutput(loss=terms.total, rewards=rewards.detach(), metrics=metrics)
