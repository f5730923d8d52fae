"""RLR (Recursive Likelihood Ratio, "half-order"): first, half and zeroth order over one trajectory.

With K = fo_steps and a sub-chain of h transitions starting at a random transition j (0 <= j <= T-K-h):
  FO  pathwise through transitions T-K..T-1, the decoder and the reward: -U.mean()
  HO  transitions j..j+h-1 re-run from x = latents[j] detached with their own noises; m = the mean of
      the last one; borrowed noise: latents[j+h] = m + sigma z; surrogate -(A * log N(latents[j+h]; m, sigma^2 I))
  ZO  every other transition (set C): latent mode -(A * log p(latents[i+1] | latents[i])), param mode a
      two-point SPSA on the trainable parameters, perturbed only at the transitions of C
Every transition is covered once, so for any j the sum is unbiased (the leave-one-out baselines keep it
so); log-densities are SUMMED over latent dims. ZO terms are differentiated one step at a time
(common.GradientSum), so memory does not grow with T. The rollout is sampled without grad and the FO
transitions re-run with their stored noises (K extra UNet forwards), so that the param mode can
perturb the weights in place before any graph holds them.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import (
    Baseline,
    GradientSum,
    advantages,
    detached,
    draw,
    gaussian_log_density,
    reward_metrics,
    score,
    utility,
)
from rlr_cli.interfaces import EstimatorOutput, Policy, Reward, Rollout

ZO_DEFAULTS = {"mode": "latent", "steps": "all", "sigma": 1e-3}


def zo_config(zo: dict | None) -> dict:
    """zo: {mode: latent | param | none, steps: all | m (int >= 1), sigma: SPSA scale} with defaults."""
    cfg = dict(ZO_DEFAULTS)
    unknown = set(zo or {}) - set(cfg)
    if unknown:
        raise UserError(f"estimator.zo has unknown keys {sorted(unknown)}; valid: {sorted(cfg)}")
    cfg.update(zo or {})
    if cfg["mode"] not in ("latent", "param", "none"):
        raise UserError(f"estimator.zo.mode={cfg['mode']!r}; valid: latent, param, none")
    if cfg["steps"] != "all" and not (isinstance(cfg["steps"], int) and cfg["steps"] >= 1):
        raise UserError(f"estimator.zo.steps={cfg['steps']!r}; valid: all or an integer >= 1")
    if not float(cfg["sigma"]) > 0:
        raise UserError(f"estimator.zo.sigma={cfg['sigma']!r} must be > 0")
    return cfg


def spsa_gradient(
    policy: Policy, reward: Reward, rollout: Rollout, steps: Sequence[int], sigma: float,
    generator: torch.Generator, target: float | None, reward_scale: float,
) -> list[Tensor]:
    """Two-point SPSA estimate of d E[U] / d theta through transitions `steps` only.

    One Gaussian direction D per call; the chain is re-run twice from the rollout's input of the first
    perturbed transition with the rollout's noises, theta +- sigma D at `steps` and theta elsewhere: g = mean_b(U+ - U-) / (2 sigma) * D.
    Unbiased for the gradient of the Gaussian-smoothed objective.
    """
    params = policy.trainable_parameters()
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]
    saved = [p.detach().clone() for p in params]
    steps = set(steps)

    def run(sign: float) -> Tensor:
        x = rollout.latents[:, min(steps)].detach()  # the chain up to the first perturbed step is the rollout's
        with torch.no_grad():
            for i in range(min(steps), policy.num_steps):
                if i in steps:
                    for p, d in zip(params, direction):
                        p.add_(sign * sigma * d)
                x = policy.transition(rollout, i, x).sample
                if i in steps:
                    for p, s in zip(params, saved):
                        p.copy_(s)
            return utility(score(policy, reward, x, rollout.prompts), target, reward_scale)

    coefficient = (run(1.0) - run(-1.0)).mean() / (2 * sigma)
    return [coefficient * d for d in direction]


class RLR:
    """The paper's estimator: FO (last fo_steps) + HO (h-step sub-chain) + ZO (the rest); unbiased."""

    def __init__(
        self,
        h: int = 1,
        fo_steps: int = 1,
        zo: dict | None = None,
        fo_weight: float = 1.0,
        ho_weight: float = 1.0,
        zo_weight: float = 1.0,
        baseline: Literal["leave_one_out_prompt", "leave_one_out_batch", "batch_mean", "none"] = "leave_one_out_prompt",
        advantage_std: bool = False,
        target: float | None = None,
        reward_scale: float = 1.0,
    ):
        if h < 1 or fo_steps < 0:
            raise UserError(f"estimator=rlr needs h >= 1 and fo_steps >= 0, got h={h}, fo_steps={fo_steps}")
        self.h, self.fo_steps, self.zo = h, fo_steps, zo_config(zo)
        self.fo_weight, self.ho_weight, self.zo_weight = fo_weight, ho_weight, zo_weight
        self.baseline: Baseline = baseline
        self.advantage_std, self.target, self.reward_scale = advantage_std, target, reward_scale

    def _zo_steps(self, generator: torch.Generator, others: list[int]) -> tuple[list[int], float]:
        """The ZO transitions used this call and their weight |C| / m."""
        if self.zo["mode"] == "none" or not others:
            return [], 0.0
        if self.zo["steps"] == "all" or self.zo["steps"] >= len(others):
            return others, 1.0
        m = self.zo["steps"]
        chosen = torch.randperm(len(others), generator=generator)[:m].tolist()
        return sorted(others[k] for k in chosen), len(others) / m

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator):
        t, k, h = policy.num_steps, self.fo_steps, self.h
        if k + h > t:
            raise UserError(f"estimator=rlr needs fo_steps + h <= T, got {k} + {h} > {t}")
        if k > 0 and not reward.differentiable:
            raise UserError(
                f"estimator=rlr with fo_steps={k} backpropagates through the reward, but "
                f"{type(reward).__name__} is not differentiable; set estimator.fo_steps=0"
            )
        start = draw(generator, 0, t - k - h)  # HO covers transitions start .. start+h-1
        others = [i for i in range(t - k) if not start <= i < start + h]  # C: the ZO transitions
        steps, weight = self._zo_steps(generator, others)
        with torch.no_grad():
            rollout = detached(policy.sample(prompts, generator=generator, grad_steps=()))
        zo = GradientSum(policy.trainable_parameters())
        if steps and self.zo["mode"] == "param":  # first: it perturbs the weights in place, no graph may hold them
            g = spsa_gradient(
                policy, reward, rollout, steps, float(self.zo["sigma"]), generator, self.target, self.reward_scale
            )
            zo.add_gradient([-self.zo_weight * weight * gi for gi in g])

        # 1. FO: the last k transitions re-run with their own noises from a detached x_{T-k}, pathwise
        #    through them, the decoder and the reward (x_0 equals the rollout's)
        x = rollout.latents[:, t - k]
        for i in range(t - k, t):
            x = policy.transition(rollout, i, x).sample
        with torch.set_grad_enabled(k > 0):
            rewards = score(policy, reward, x, prompts)
        u = utility(rewards, self.target, self.reward_scale)
        fo_loss = -self.fo_weight * u.mean() if k > 0 else u.new_zeros(())
        adv = advantages(u, prompts, self.baseline, self.advantage_std)

        # 2. HO: h transitions with grad from a detached start, borrowed noise of the last one
        x = rollout.latents[:, start]
        for i in range(start, start + h - 1):
            x = policy.transition(rollout, i, x).sample
        last = policy.transition(rollout, start + h - 1, x)
        log_density = gaussian_log_density(rollout.latents[:, start + h], last.mean, last.std)
        ho_loss = -self.ho_weight * (adv * log_density).mean()

        # 3. ZO, latent mode: one likelihood-ratio term per transition of C (or of the subset)
        if steps and self.zo["mode"] == "latent":
            for i in steps:
                zo.add(-self.zo_weight * weight * (adv * policy.step_log_prob(rollout, i, reduce="sum")).mean())

        loss = fo_loss + ho_loss + zo.loss(fo_loss)
        metrics = reward_metrics(rewards) | {
            "fo_loss": float(fo_loss.item()),
            "ho_loss": float(ho_loss.item()),
            "ho_start": float(start),
            "zo_steps": float(len(steps)),
        }
        return EstimatorOutput(loss=loss, rewards=rewards.detach(), metrics=metrics)


class RLROfficial:
    """The released RLR scripts (RTkenny/RLR-Optimizer, rlr_trainer_v_b.py) without their defects.

    Calls alternate over one sampled batch kept in a buffer, one optimizer step each (the released code
    steps the optimizer after FO and again after HO):
      FO call  sample (grad on the last transition), loss -fo_weight * U.mean(); store the batch
      HO call  h = 1 at `chain_len` distinct random transitions among 0..T-2 (never the last one: the
               released code can pick the eta = 0 last step and get NaN), each a PPO-clipped ratio loss
               mean_b max(-A ratio, -A clip(ratio, 1 +- clip_range)) on the DDPO log-prob (mean over
               dims) with batch-normalised utilities as A, averaged over the chain_len steps, times ho_weight
    No ZO term runs, so it is biased. The trainer's gradient clipping applies (the released branch has none).
    """

    def __init__(
        self,
        chain_len: int = 2,
        fo_weight: float = 0.05,
        ho_weight: float = 0.001,
        clip_range: float = 1e-4,
        target: float | None = None,
        reward_scale: float = 1.0,
    ):
        if chain_len < 1:
            raise UserError(f"estimator=rlr_official needs chain_len >= 1, got {chain_len}")
        self.chain_len, self.fo_weight, self.ho_weight, self.clip_range = chain_len, fo_weight, ho_weight, clip_range
        self.target, self.reward_scale = target, reward_scale
        self._buffer: dict | None = None

    @property
    def at_cycle_boundary(self) -> bool:
        """True when no FO batch awaits its HO step: a checkpoint taken now resumes exactly."""
        return self._buffer is None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self._buffer = None

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator):
        if self._buffer is None:
            return self._first_order(policy, reward, prompts, generator)
        return self._half_order(policy, generator)

    def _first_order(self, policy, reward, prompts, generator) -> EstimatorOutput:
        if not reward.differentiable:
            raise UserError(f"estimator=rlr_official backpropagates through the reward; {type(reward).__name__} is not differentiable")
        t = policy.num_steps
        rollout = policy.sample(prompts, generator=generator, grad_steps=[t - 1])
        rewards = score(policy, reward, rollout.final, prompts)
        u = utility(rewards, self.target, self.reward_scale)
        adv = advantages(u, prompts, "batch_mean", scale_by_std=True)
        self._buffer = {"rollout": detached(rollout), "advantages": adv, "rewards": rewards.detach()}
        loss = -self.fo_weight * u.mean()
        return EstimatorOutput(loss=loss, rewards=rewards.detach(), metrics=reward_metrics(rewards) | {"phase_ho": 0.0})

    def _half_order(self, policy, generator) -> EstimatorOutput:
        buffer, self._buffer = self._buffer, None
        rollout, adv = buffer["rollout"], buffer["advantages"]
        t = policy.num_steps
        stochastic = list(range(t - 1))  # never the last transition (the released code's eta = 0 NaN)
        chosen = torch.randperm(len(stochastic), generator=generator)[: self.chain_len].tolist()
        grads = GradientSum(policy.trainable_parameters())
        clipped = []
        for k in chosen:
            i = stochastic[k]
            new = policy.step_log_prob(rollout, i, reduce="mean")
            ratio = torch.exp(new - rollout.log_probs[:, i].to(new))
            a = adv.to(new)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).mean()
            grads.add(self.ho_weight * loss / len(chosen))
            clipped.append(((ratio.detach() - 1).abs() > self.clip_range).float().mean().item())
        metrics = reward_metrics(buffer["rewards"]) | {"phase_ho": 1.0, "clipfrac": sum(clipped) / len(clipped)}
        return EstimatorOutput(loss=grads.loss(adv.new_zeros(())), rewards=buffer["rewards"], metrics=metrics)
