"""The contracts between policy, reward, estimator and trainer (Protocols, not base classes).

Chain indexing used everywhere: a rollout of T transitions has latents x_T..x_0 stored in order, so
`latents[:, i]` is the input of transition `i` (i = 0 is the first, pure-noise step) and
`latents[:, i + 1]` its output; transition T-1 is the last one (x_1 -> x_0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled trajectories.

    latents   (B, T+1, C, H, W)  x_T..x_0; carries autograd history on the steps sampled with grad
    noises    (B, T, C, H, W)    the z drawn at each transition (x_next = mean + std * z)
    log_probs (B, T)             log p(x_next | x) of each transition, mean over latent dims, detached
    timesteps (T,)               scheduler timesteps of the transitions
    cond                         conditioning the policy needs to re-run a transition (opaque here)
    prompts                      the B prompts
    """

    latents: Tensor
    noises: Tensor
    log_probs: Tensor
    timesteps: Tensor
    cond: Any
    prompts: list[str]

    @property
    def num_steps(self) -> int:
        return self.noises.shape[1]

    @property
    def final(self) -> Tensor:
        """x_0 (B, C, H, W), with whatever graph sampling left on it."""
        return self.latents[:, -1]


@dataclass(frozen=True)
class Transition:
    """Output of one sampler transition: x_next = mean + std * noise; shapes (B, C, H, W), std scalar."""

    sample: Tensor
    mean: Tensor
    std: float


@runtime_checkable
class Policy(Protocol):
    """A sampler whose transitions depend on trainable parameters."""

    num_steps: int

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def sample(
        self, prompts: Sequence[str], *, generator: torch.Generator, grad_steps: Sequence[int] = ()
    ) -> Rollout:
        """Sample B trajectories; transitions in `grad_steps` keep autograd history (params and input)."""

    def transition(self, rollout: Rollout, i: int, x: Tensor, noise: Tensor | None = None) -> Transition:
        """Re-run transition i of `rollout` from latent x (B,C,H,W) with grad; noise None: the rollout's."""

    def step_log_prob(self, rollout: Rollout, i: int, reduce: str = "mean") -> Tensor:
        """log p_theta(latents[i+1] | latents[i]) (B,), grad to theta only; reduce: mean | sum over dims."""

    def predict_x0(self, rollout: Rollout, i: int, x: Tensor) -> Tensor:
        """One-step prediction of x_0 (B,C,H,W) from the input x of transition i, with grad."""

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) in [0,1]."""

    def save_adapter(self, directory: str) -> None: ...

    def load_adapter(self, directory: str) -> None: ...


@runtime_checkable
class Reward(Protocol):
    """images (B,3,H,W) in [0,1], prompts (B) -> (B,), higher is better."""

    differentiable: bool

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


@dataclass
class EstimatorOutput:
    """loss: scalar whose autograd gradient is the estimator's gradient estimate (of -J)."""

    loss: Tensor
    rewards: Tensor  # (B,) raw rewards of the samples behind this estimate, detached
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Estimator(Protocol):
    def __call__(
        self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator
    ) -> EstimatorOutput: ...


@runtime_checkable
class StatefulEstimator(Estimator, Protocol):
    """An estimator with state that a checkpoint must carry (e.g. DDPO's per-prompt statistics)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None: ...

    def close(self) -> None: ...
