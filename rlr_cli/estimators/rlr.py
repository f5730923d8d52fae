"""RLR (Recursive Likelihood Ratio, "half-order"): first, half and zeroth order over one trajectory.

With K = fo_steps and a sub-chain of h transitions starting at a random transition j (0 <= j <= T-K-h):
  FO  pathwise through transitions T-K..T-1, the decoder and the reward: -U.mean()
  HO  transitions j..j+h-1 re-run from x = latents[j] detached with their own noises; m = the mean of
      the last one; borrowed noise: latents[j+h] = m + sigma z; surrogate -(A * log N(latents[j+h]; m, sigma^2 I))
  ZO  every other transition (set C): latent mode -(A * log p(latents[i+1] | latents[i])), param mode a
      two-point SPSA on the trainable parameters, perturbed only at the transitions of C (step_param: an
      independent direction per transition, scaled by its noise level)
Every transition is covered once, so for any j the sum is unbiased (the leave-one-out baselines keep it
so), and so is any law of j: uniform within ho_range, or j=grad_norm's. Log-densities are SUMMED over
latent dims. baseline=state: each likelihood-ratio term of transition i uses A_i = U - b(x_i), b(x_i) the
utility of the sampler's own x_0 prediction from the transition's input (it depends only on the state
before the step's noise, so the term stays unbiased), minus the leave-one-out
mean of that residual over the prompt's other samples; b is scored every baseline_every-th transition and
reused until the next (an earlier state is as valid a baseline, if a less informed one). Every term goes to
the trainer's backward as soon as it is formed (FO, HO, then each ZO step), so memory does not grow with T.
The rollout is sampled without grad and the FO transitions re-run with their stored noises (K extra UNet
forwards), so that the param mode can perturb the weights in place before any graph holds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Sequence

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import (
    Baseline,
    LossTerms,
    advantages,
    detached,
    draw,
    require_differentiable,
    require_no_kl,
    require_sde_everywhere,
    require_stochastic,
    reward_metrics,
    score,
    state_advantages,
    utility,
)
from rlr_cli.interfaces import Backward, EstimatorOutput, Graph, Policy, Reward, Rollout, RunFacts
from rlr_cli.ranges import NonNegativeFloat, PositiveFloat
from rlr_cli.sampling import as_steps, gaussian_log_prob


@dataclass(frozen=True)
class ZerothOrder:
    """estimator.zo: the likelihood-ratio terms of the transitions neither FO nor HO covers."""

    mode: Literal["latent", "param", "step_param", "none"]
    steps: Literal["all"] | Annotated[int, Field(ge=1)]
    sigma: Annotated[float, Field(gt=0)]


def spsa_gradient(
    policy: Policy, reward: Reward, rollout: Rollout, steps: Sequence[int], sigma: float, per_step: bool,
    generator: torch.Generator, target: float | None, reward_scale: float,
) -> list[Tensor]:
    """Two-point SPSA estimate of d E[U] / d theta through transitions `steps` only.

    The chain is re-run twice from the rollout's input of the first perturbed transition with the
    rollout's noises, theta +- s_i D_i at each i of `steps` and theta elsewhere, D_i Gaussian:
      per_step False: one D and s_i = sigma shared by every step: g = mean_b(U+ - U-) / (2 sigma) * D
      per_step True (the paper's ZO): an independent D_i per step and s_i = sigma * std_i, the step's own
        noise level: g = mean_b(U+ - U-) / 2 * sum_i D_i / s_i
    Unbiased for the gradient of the Gaussian-smoothed objective.
    """
    params = policy.trainable_parameters()
    perturbed = sorted(steps)
    scales = {i: sigma * float(rollout.chain.std(as_steps(i, 1))[0]) if per_step else sigma for i in perturbed}
    if min(scales.values()) <= 0:
        raise UserError("estimator.zo.mode=step_param needs noise at every ZO transition (std > 0); this chain "
                        "has a deterministic one: use zo.mode=param or a larger fo_steps")

    if per_step:  # one seed per step: each D_i is drawn again where it is used, never all held at once
        seeds = {i: int(torch.randint(2**62, (1,), generator=generator)) for i in perturbed}

        def direction(i: int) -> list[Tensor]:
            local = torch.Generator().manual_seed(seeds[i])
            return [torch.randn(p.shape, generator=local, dtype=torch.float32).to(p) for p in params]
    else:
        shared = [torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) for p in params]

        def direction(i: int) -> list[Tensor]:
            return shared
    saved = [p.detach().clone() for p in params]

    def run(sign: float) -> Tensor:
        x = rollout.latents[:, perturbed[0]].detach()  # the chain up to the first perturbed step is the rollout's
        with torch.no_grad():
            for i in range(perturbed[0], policy.num_steps):
                if i in scales:
                    for p, d in zip(params, direction(i)):
                        p.add_(sign * scales[i] * d)
                x = policy.transition(rollout, i, x).sample
                if i in scales:
                    for p, s in zip(params, saved):
                        p.copy_(s)
            return utility(score(policy, reward, x, rollout.prompts), target, reward_scale)

    half_difference = (run(1.0) - run(-1.0)).mean() / 2
    if not per_step:
        return [half_difference / sigma * d for d in shared]
    gradient = [torch.zeros_like(p) for p in params]
    for i in perturbed:
        for g, d in zip(gradient, direction(i)):
            g.add_(d, alpha=float(half_difference) / scales[i])
    return gradient


def gradient_term(params: Sequence[torch.nn.Parameter], gradient: Sequence[Tensor]) -> Tensor:
    """A loss term of value 0 whose gradient w.r.t. params is `gradient`."""
    surrogate = sum((g.detach() * p).sum() for g, p in zip(gradient, params))
    assert isinstance(surrogate, Tensor)
    return surrogate - surrogate.detach()


GRAD_NORM_DECAY = 0.9  # j=grad_norm's moving average per start: about the last ten visits of each start


class RLR:
    """The paper's estimator: FO (last fo_steps) + HO (h-step sub-chain) + ZO (the rest); unbiased."""

    def __init__(
        self,
        *,
        h: Annotated[int, Field(ge=1)] | Literal["auto"],
        fo_steps: Annotated[int, Field(ge=0)],
        zo: ZerothOrder,
        fo_weight: NonNegativeFloat,
        ho_weight: NonNegativeFloat,
        zo_weight: NonNegativeFloat,
        baseline: Baseline | Literal["state"],
        baseline_every: Annotated[int, Field(ge=1)],
        j: Literal["uniform", "grad_norm"],
        ho_range: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None,
        advantage_std: bool,
        target: float | None,
        reward_scale: PositiveFloat,
    ):
        self.h: int | Literal["auto"] = h  # "auto": the trainer sets it from the memory plan before the first step
        self.fo_steps, self.zo = fo_steps, zo
        self.j, self.ho_range = j, ho_range
        self.ho_grad_norms: dict[int, float] = {}  # j=grad_norm: a moving average of the HO term's grad norm per start
        self.fo_weight, self.ho_weight, self.zo_weight = fo_weight, ho_weight, zo_weight
        self.baseline: Baseline | Literal["state"] = baseline
        self.baseline_every = baseline_every
        self.advantage_std, self.target, self.reward_scale = advantage_std, target, reward_scale

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        k, h = options["fo_steps"], options["h"]
        require_no_kl(run, "rlr")
        if h == "auto":
            if run.memory_budget_gb is None:
                raise UserError("estimator.h=auto picks h from a memory budget: set trainer.memory_budget_gb=GB")
            h = 1  # the smallest; the plan checks the rest
        if k + h > run.num_steps:
            raise UserError(f"estimator=rlr needs estimator.fo_steps + estimator.h <= model.num_steps, got "
                            f"{k} + {h} > {run.num_steps}")
        zo = options["zo"]
        same_terms = h == 1 and zo.mode == "latent" and zo.steps == "all" and options["ho_weight"] == options["zo_weight"]
        if same_terms and (options["ho_range"] or options["j"] != "uniform"):
            raise UserError("estimator.ho_range and estimator.j choose where the HO sub-chain starts, which changes "
                            "nothing at h=1 with every ZO step in latent mode (HO at h=1 is the likelihood-ratio "
                            "term ZO would give that step): set estimator.h >= 2")
        if options["ho_range"] is not None:
            a, b = options["ho_range"]
            if not a <= b <= run.num_steps - k - h:
                raise UserError(f"estimator.ho_range=[{a}, {b}] must satisfy a <= b <= model.num_steps - fo_steps - h "
                                f"= {run.num_steps - k - h} (the HO sub-chain starts at a transition in [a, b])")
        if k > 0:
            require_differentiable(run, f"rlr with fo_steps={k}", "backpropagates through the reward (set "
                                   "estimator.fo_steps=0 for a non-differentiable one)")
        require_stochastic(run, "rlr")
        require_sde_everywhere(run, "rlr")

    def graphs(self, num_steps: int) -> list[Graph]:
        """The graphs of the loss terms, each freed by its backward: FO (through the reward), HO, one ZO step."""
        assert self.h != "auto", "plan.auto_h sets h first"
        out = [Graph("HO", self.h, reward=False, chained=self.h > 1)]
        if self.fo_steps:
            out.append(Graph("FO", self.fo_steps, reward=True))
        if self.zo.mode == "latent":
            out.append(Graph("ZO, each step", 1, reward=False, chained=False))
        return out

    def _zo_steps(self, generator: torch.Generator, others: list[int]) -> tuple[list[int], float]:
        """The ZO transitions used this call and their weight |C| / m."""
        if self.zo.mode == "none" or not others:
            return [], 0.0
        if self.zo.steps == "all" or self.zo.steps >= len(others):
            return others, 1.0
        m = self.zo.steps
        chosen = torch.randperm(len(others), generator=generator)[:m].tolist()
        return sorted(others[k] for k in chosen), len(others) / m

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput:
        t, k, h = policy.num_steps, self.fo_steps, self.h
        assert h != "auto", "the trainer resolves estimator.h=auto before the first step"
        start = self._draw_start(generator, t - k - h)  # HO covers transitions start .. start+h-1
        others = [i for i in range(t - k) if not start <= i < start + h]  # C: the ZO transitions
        steps, weight = self._zo_steps(generator, others)
        with torch.no_grad():
            rollout = detached(policy.sample(prompts, generator=generator, grad_steps=(),
                                             keep_x0=self.baseline == "state"))
        terms = LossTerms(backward)
        if steps and self.zo.mode in ("param", "step_param"):  # first: it perturbs the weights in place
            g = spsa_gradient(policy, reward, rollout, steps, self.zo.sigma, self.zo.mode == "step_param", generator,
                              self.target, self.reward_scale)
            terms.add(gradient_term(policy.trainable_parameters(), [-self.zo_weight * weight * gi for gi in g]))

        # 1. FO: the last k transitions re-run with their own noises from a detached x_{T-k}, pathwise
        #    through them, the decoder and the reward (x_0 equals the rollout's)
        x = rollout.latents[:, t - k]
        for i in range(t - k, t):
            x = policy.transition(rollout, i, x).sample
        with torch.set_grad_enabled(k > 0):
            rewards = score(policy, reward, x, prompts)
        u = utility(rewards, self.target, self.reward_scale)
        fo_loss = -self.fo_weight * u.mean()
        if k > 0:
            terms.add(fo_loss)
        scored = [start + h - 1, *(steps if self.zo.mode == "latent" else [])]  # the transitions whose noise is scored
        adv = self._advantages(policy, reward, rollout, u, scored)

        # 2. HO: h transitions with grad from a detached start, borrowed noise of the last one
        ho_loss = -self.ho_weight * (adv[start + h - 1] * self._ho_log_density(policy, rollout, start, h)).mean()
        terms.add(self._measured(policy, ho_loss, start) if self.j == "grad_norm" else ho_loss)

        # 3. ZO, latent mode: one likelihood-ratio term per transition of C (or of the subset)
        if steps and self.zo.mode == "latent":
            for i in steps:
                terms.add(-self.zo_weight * weight * (adv[i] * policy.step_log_prob(rollout, i, reduce="sum")).mean())

        metrics = reward_metrics(rewards) | {
            "fo_loss": float(fo_loss.detach()) if k > 0 else 0.0,
            "ho_loss": float(ho_loss.detach()),
            "ho_start": float(start),
            "zo_steps": float(len(steps)),
        }
        return EstimatorOutput(loss=terms.total, rewards=rewards.detach(), metrics=metrics)

    def _draw_start(self, generator: torch.Generator, last: int) -> int:
        """The HO start j in [0, last], within ho_range: uniform, or a softmax of the HO term's past gradient
        norms (j=grad_norm). Every j gives an unbiased sum, so any law over j does."""
        low, high = self.ho_range if self.ho_range is not None else (0, last)
        if self.j == "uniform":
            return draw(generator, low, high)
        seen = [self.ho_grad_norms[i] for i in range(low, high + 1) if i in self.ho_grad_norms]
        if not seen:
            return draw(generator, low, high)
        # a start not measured yet counts as the largest seen, so each is tried; norms relative to their mean
        norms = torch.tensor([self.ho_grad_norms.get(i, max(seen)) for i in range(low, high + 1)], dtype=torch.float64)
        weights = torch.softmax(norms / norms.mean().clamp_min(1e-30), dim=0)
        return low + int(torch.multinomial(weights, 1, generator=generator).item())

    def _measured(self, policy: Policy, ho_loss: Tensor, start: int) -> Tensor:
        """The HO term as its own gradient, whose norm updates the moving average of start j."""
        params = policy.trainable_parameters()
        grads = torch.autograd.grad(ho_loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = float(torch.cat([g.double().flatten() for g in grads]).norm())
        previous = self.ho_grad_norms.get(start)
        self.ho_grad_norms[start] = norm if previous is None else GRAD_NORM_DECAY * previous + (1 - GRAD_NORM_DECAY) * norm
        return gradient_term(params, grads)

    def state_dict(self) -> dict:
        return {"ho_grad_norms": {str(i): v for i, v in self.ho_grad_norms.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ho_grad_norms = {int(i): float(v) for i, v in state.get("ho_grad_norms", {}).items()}

    def _advantages(self, policy: Policy, reward: Reward, rollout: Rollout, u: Tensor,
                    steps: list[int]) -> dict[int, Tensor]:
        """Detached (B,) advantages of the likelihood-ratio term of each transition in steps."""
        if self.baseline != "state":
            a = advantages(u, rollout.prompts, self.baseline, self.advantage_std)
            return dict.fromkeys(steps, a)
        adv = state_advantages(policy, reward, rollout, u, steps, self.baseline_every, self.target, self.reward_scale)
        scale = u.detach().std() + 1e-8 if self.advantage_std and u.numel() > 1 else 1.0
        return {i: a / scale for i, a in adv.items()}

    @staticmethod
    def _ho_log_density(policy: Policy, rollout: Rollout, start: int, h: int) -> Tensor:
        """log N(x_{start+h}; m_theta, sigma^2 I) summed over dims, m_theta through h transitions from x_start."""
        if h == 1:  # one denoiser call
            return policy.step_log_prob(rollout, start, reduce="sum")
        x = rollout.latents[:, start]
        for i in range(start, start + h - 1):
            x = policy.transition(rollout, i, x).sample
        last = policy.transition(rollout, start + h - 1, x)
        return gaussian_log_prob(rollout.latents[:, start + h], last.mean, last.std, reduce="sum")


@dataclass(frozen=True)
class OfficialUpdate:
    """One optimizer step of rlr_official on a collected batch: its FO step, or its HO step."""

    phase: Literal["fo", "ho"]
    rollout: Rollout
    rewards: Tensor  # (B,)
    advantages: Tensor  # (B,) batch-normalised utilities
    ho_steps: tuple[int, ...]  # the HO transitions (drawn when the batch was collected)


class RLROfficial:
    """The released RLR scripts (RTkenny/RLR-Optimizer, rlr_trainer_v_b.py) without their defects.

    Each collected batch is trained with two optimizer steps (the released code steps the optimizer
    after FO and again after HO):
      FO  the last transition re-run with grad from the stored x_1 and noise, loss -fo_weight * U.mean()
      HO  h = 1 at `chain_len` distinct random transitions among 0..T-2 (never the last one: the
          released code can pick the eta = 0 last step and get NaN), each a PPO-clipped ratio loss
          mean_b max(-A ratio, -A clip(ratio, 1 +- clip_range)) on the DDPO log-prob (mean over
          dims) with batch-normalised utilities as A, averaged over the chain_len steps, times ho_weight
    No ZO term runs, so it is biased. The trainer's gradient clipping applies (the released branch has none).
    """

    def __init__(
        self,
        *,
        chain_len: Annotated[int, Field(ge=1)],
        fo_weight: NonNegativeFloat,
        ho_weight: NonNegativeFloat,
        clip_range: Annotated[float, Field(gt=0)],
        target: float | None,
        reward_scale: PositiveFloat,
    ):
        self.chain_len, self.fo_weight, self.ho_weight, self.clip_range = chain_len, fo_weight, ho_weight, clip_range
        self.target, self.reward_scale = target, reward_scale

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        require_no_kl(run, "rlr_official")
        if options["chain_len"] > run.num_steps - 1:
            raise UserError(f"estimator.chain_len={options['chain_len']} exceeds the {run.num_steps - 1} "
                            "transitions HO can pick (all but the last of model.num_steps)")
        if run.grad_accum != 1:
            raise UserError("estimator=rlr_official makes one optimizer step per phase: set trainer.grad_accum=1")
        require_differentiable(run, "rlr_official")
        require_stochastic(run, "rlr_official")

    def collect(self, policy: Policy, reward: Reward, prompts: Sequence[str],
                generator: torch.Generator) -> list[OfficialUpdate]:
        with torch.no_grad():
            rollout = detached(policy.sample(prompts, generator=generator, grad_steps=()))
            rewards = score(policy, reward, rollout.final, prompts)
        u = utility(rewards, self.target, self.reward_scale)
        adv = advantages(u, prompts, "batch_mean", scale_by_std=True)
        stochastic = list(range(policy.num_steps - 1))  # never the last transition (the released code's NaN)
        chosen = torch.randperm(len(stochastic), generator=generator)[: self.chain_len].tolist()
        ho_steps = tuple(stochastic[k] for k in chosen)
        return [OfficialUpdate(phase, rollout, rewards, adv, ho_steps) for phase in ("fo", "ho")]

    def update(self, policy: Policy, reward: Reward, update: OfficialUpdate, backward: Backward) -> EstimatorOutput:
        terms = LossTerms(backward)
        metrics = reward_metrics(update.rewards) | {"phase_ho": float(update.phase == "ho")}
        if update.phase == "fo":
            last = policy.num_steps - 1
            x0 = policy.transition(update.rollout, last, update.rollout.latents[:, last]).sample
            rewards = score(policy, reward, x0, update.rollout.prompts)
            terms.add(-self.fo_weight * utility(rewards, self.target, self.reward_scale).mean())
            return EstimatorOutput(loss=terms.total, rewards=update.rewards, metrics=metrics)
        clipped = []
        for i in update.ho_steps:
            new = policy.step_log_prob(update.rollout, i, reduce="mean")
            ratio = torch.exp(new - update.rollout.log_probs[:, i].to(new))
            a = update.advantages.to(new)
            loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).mean()
            terms.add(self.ho_weight * loss / len(update.ho_steps))
            clipped.append(((ratio.detach() - 1).abs() > self.clip_range).float().mean().item())
        metrics["clipfrac"] = sum(clipped) / len(clipped)
        return EstimatorOutput(loss=terms.total, rewards=update.rewards, metrics=metrics)
