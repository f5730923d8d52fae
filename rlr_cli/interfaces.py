"""The contracts between model family, policy, chain, reward, estimator and trainer (Protocols).

Every member named here is one that some other layer really uses; docs/architecture.md says who.

Chain indexing used everywhere: a rollout of T transitions has latents x_T..x_0 stored in order, so
`latents[:, i]` is the input of transition `i` (i = 0 is the first, pure-noise step) and
`latents[:, i + 1]` its output; transition T-1 is the last one (x_1 -> x_0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

Backward = Callable[[Tensor], None]
"""The trainer's backward: differentiates one scalar loss term into the trainable weights' .grad."""


# ---- sampling -------------------------------------------------------------------------------------
class Chain(Protocol):
    """A sampler's transitions: x_next = mean(x, model output) + std * z, z ~ N(0, I).

    Steps are given as a (B,) int64 tensor of transition indices, so one denoiser call can serve a
    batch whose samples sit at different transitions.
    """

    @property
    def num_steps(self) -> int: ...

    @property
    def timesteps(self) -> Tensor:
        """(T,) the model's timestep input of each transition, descending."""
        ...

    @property
    def guidance_scale(self) -> float | None:
        """The guidance this chain samples with; None: the policy's."""
        ...

    def adapters(self, i: int) -> tuple[str, ...]:
        """Frozen extra adapters active beside the trainable one at transition i (usually none)."""
        ...

    def std(self, steps: Tensor) -> Tensor:
        """(B,) -> (B,) float64 noise scale of each sample's transition."""
        ...

    def mean(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """Mean of x_next (B,C,H,W) from x and the guided model output (B,C,H,W)."""
        ...

    def predict_x0(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """One-step prediction of x_0 (B,C,H,W) from x and the model output."""
        ...

    def noised(self, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        """x_0 carried by the forward process q(x_t | x_0) to each sample's transition input (DRaFT-LV)."""
        ...

    def resampled(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> Chain:
        """The same schedule with other sampling settings (held-out evaluation's); None keeps this chain's."""
        ...


@dataclass(frozen=True)
class Rollout:
    """One batch of sampled trajectories.

    latents   (B, T+1, C, H, W)  x_T..x_0; carries autograd history on the steps sampled with grad
    noises    (B, T, C, H, W)    the z drawn at each transition (x_next = mean + std * z)
    log_probs (B, T)             log p(x_next | x) of each transition, mean over latent dims, detached
    chain                        the chain it was sampled on (transitions re-run on the same one)
    cond                         conditioning the policy needs to re-run a transition (opaque here)
    prompts                      the B prompts
    kl        (B,)               with sample(kl=True): sum over the steps sampled with grad of
                                 KL(p_theta || p_ref) = ||mean_theta - mean_ref||^2 / (2 std^2), with grad
    x0_predictions (B, T, C, H, W) with sample(keep_x0=True): the sampler's prediction of x_0 from each
                                 transition's input, detached (free with the model output; RLR's state baseline)
    """

    latents: Tensor
    noises: Tensor
    log_probs: Tensor
    chain: Chain
    cond: Any
    prompts: list[str]
    kl: Tensor | None = None  # (B,) sample(kl=True): the KL to the reference summed over the grad steps, with grad
    x0_predictions: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.noises.shape[1]

    @property
    def final(self) -> Tensor:
        """x_0 (B, C, H, W), with whatever graph sampling left on it."""
        return self.latents[:, -1]


@dataclass(frozen=True)
class Transition:
    """Output of one sampler transition: x_next = mean + std * noise; shapes (B, C, H, W), std (B,)."""

    sample: Tensor
    mean: Tensor
    std: Tensor


# ---- the model ------------------------------------------------------------------------------------
class LoraFormat(Protocol):
    """How a family's pipeline stores LoRA files (diffusers' LoRA loader mixin of its pipeline class)."""

    @property
    def prefix(self) -> str:
        """Key prefix of the denoiser's layers in a LoRA file: unet | transformer."""
        ...

    def save(self, directory: str, layers: dict[str, Tensor], metadata: dict) -> None: ...

    def load_into(self, network: torch.nn.Module, state: dict, alphas: dict | None, metadata: dict | None,
                  adapter_name: str) -> None: ...


class Family(Protocol):
    """The per-family part of a policy: what differs between SD 1.x, SDXL, SD3 and FLUX."""

    @property
    def denoiser(self) -> Any:
        """The network the trainable adapter lives in (UNet, transformer): a diffusers ModelMixin."""
        ...

    @property
    def lora_format(self) -> LoraFormat: ...

    @property
    def scheduler_config(self) -> Any:
        """The pipeline's scheduler config (chains are built from it)."""
        ...

    def modules(self) -> list[torch.nn.Module]:
        """Every module of the pipeline (moved to the device together)."""
        ...

    def encode(self, prompts: Sequence[str], negative: bool) -> Any:
        """Prompt conditioning for the denoiser; with `negative`, also the negative prompt's (for CFG)."""
        ...

    def predict(self, x: Tensor, t: Tensor, cond: Any, guidance_scale: float) -> Tensor:
        """Guided model output (B,C,H,W) at timesteps t (B,) in float32."""
        ...

    def latent_shape(self, batch: int) -> tuple[int, ...]: ...

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B,C,h,w) -> decoder output (B,3,H,W) in [-1, 1] (unclamped), float32."""
        ...

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(how many of prompts the text encoder cuts, its token limit)."""
        ...


@runtime_checkable
class Policy(Protocol):
    """A sampler whose transitions depend on trainable parameters (what every estimator uses)."""

    @property
    def num_steps(self) -> int:
        """Transitions of the policy's own chain."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def sample(
        self, prompts: Sequence[str], *, generator: torch.Generator, grad_steps: Sequence[int] = (),
        chain: Chain | None = None, kl: bool = False, shared_start: int = 1, keep_x0: bool = False,
    ) -> Rollout:
        """Sample B trajectories on `chain` (default: the policy's); `grad_steps` keep autograd history;
        `kl`: also the KL to the reference policy on the grad steps (Rollout.kl); `shared_start`: each run
        of that many consecutive samples starts from one x_T (DanceGRPO's same noise for a group); `keep_x0`: also
        Rollout.x0_predictions (kept only on request: it is T latents per sample)."""
        ...

    def transition(self, rollout: Rollout, i: int, x: Tensor, noise: Tensor | None = None) -> Transition:
        """Re-run transition i of `rollout` from latent x (B,C,H,W) with grad; noise None: the rollout's."""
        ...

    def step_log_prob(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> Tensor:
        """log p_theta(x_{i+1} | x_i) (B,) at each sample's step i (an int, or (B,) indices), grad to theta
        only, in one denoiser call; reduce: mean | sum over latent dims."""
        ...

    def step_log_prob_kl(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
        """step_log_prob and, from the same call, the KL to the reference (the model with its trainable
        adapter off) at those transitions, (B,) with grad to theta, reduced over latent dims the same way."""
        ...

    def predict_x0(self, rollout: Rollout, i: int, x: Tensor) -> Tensor:
        """One-step prediction of x_0 (B,C,H,W) from the input x of transition i, with grad."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """latents (B,C,h,w) -> images (B,3,H,W) in [0,1]."""
        ...


class TrainablePolicy(Policy, Protocol):
    """What the trainer and the evaluator use beyond an estimator's needs."""

    @property
    def trajectories_sampled(self) -> int:
        """Every trajectory sample() drew so far (sample budgets count these)."""
        ...

    def to(self, device: torch.device | str) -> TrainablePolicy: ...

    def save_adapter(self, directory: str) -> None: ...

    def load_adapter(self, directory: str) -> None: ...

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(how many of prompts the text encoder cuts, its token limit)."""
        ...

    def eval_chain(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> Chain:
        """The training chain with these sampling settings replaced (None keeps the training value)."""
        ...


class AdapterPolicy(Policy, Protocol):
    """A policy that can hold frozen extra LoRAs (ShortFT's shortcut) beside its trainable one."""

    @property
    def chain(self) -> Chain: ...

    @property
    def scheduler_config(self) -> Any: ...

    def add_frozen_adapter(self, name: str, state: dict, alphas: dict | None, metadata: dict | None,
                           scale: float) -> None: ...


# ---- rewards and metrics --------------------------------------------------------------------------
@runtime_checkable
class TextLimited(Protocol):
    """A reward that reads prompts through a tokenizer with a length limit (rlr-score warns of cuts)."""

    def overlong(self, prompts: Sequence[str]) -> tuple[int, int]:
        """(how many of prompts its tokenizer cuts, its token limit)."""
        ...


@runtime_checkable
class Reward(Protocol):
    """images (B,3,H,W) in [0,1], prompts (B) -> (B,), higher is better."""

    @property
    def differentiable(self) -> bool:
        """A class attribute: the validation pass reads it before anything loads."""
        ...

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Weights follow the images' device (no `to`: a reward moves itself on its first call there)."""
        ...


class Metric(Protocol):
    """A held-out metric: images, prompts -> (B,) or {name: (B,)}."""

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor | dict[str, Tensor]: ...


# ---- estimators -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFacts:
    """What an estimator's cross-group check may read, known before any weight loads."""

    num_steps: int  # transitions of the model's chain
    eta: float  # the chain's stochasticity (0: deterministic): DDIM's eta, the flow SDE's noise level
    sampler: str  # the model family's chain: ddim (SD 1.x, SDXL) | flow (SD3, FLUX)
    sde_window: bool  # a flow chain samples the SDE on some steps only (the ODE elsewhere)
    reward_differentiable: bool
    lora: bool  # the model trains a LoRA (not all weights)
    batch_size: int  # trainer.batch_size
    grad_accum: int  # trainer.grad_accum
    kl_beta: float  # regularizer.kl_beta
    memory_budget_gb: float | None = None  # trainer.memory_budget_gb


@dataclass
class EstimatorOutput:
    """What one estimate reports; its gradient is already in the trainable weights' .grad."""

    loss: float  # sum of the loss terms handed to backward
    rewards: Tensor  # (B,) raw rewards of the samples behind this estimate, detached
    metrics: dict[str, float] = field(default_factory=dict)


class Estimator(Protocol):
    """Fresh samples every call; hands each loss term to `backward` (the trainer's), frees its graph."""

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        """The validation pass's rules across groups for these options (a UserError), before anything loads."""
        ...

    def __call__(self, policy: Policy, reward: Reward, prompts: Sequence[str], generator: torch.Generator,
                 backward: Backward) -> EstimatorOutput: ...


@runtime_checkable
class BufferedEstimator(Protocol):
    """Samples a batch once, then trains on it over several optimizer steps (DDPO, rlr_official).

    The trainer drives the phases: `collect` (sampling, no gradients) returns the list of updates the
    batch is trained with; each optimizer step runs one `update`. A checkpoint is taken only between
    batches, so a resumed run never needs a half-used buffer.
    """

    @staticmethod
    def check(options: dict, run: RunFacts) -> None:
        """As Estimator.check."""
        ...

    def collect(self, policy: Policy, reward: Reward, prompts: Sequence[str],
                generator: torch.Generator) -> list[Any]: ...

    def update(self, policy: Policy, reward: Reward, update: Any, backward: Backward) -> EstimatorOutput: ...


@dataclass(frozen=True)
class Graph:
    """The graph of one loss term: `calls` differentiated denoiser calls, through the decoder + reward or not;
    chained: the calls run as a chain (transition), else one call on its own (step_log_prob)."""

    what: str  # the term, as the plan prints it
    calls: int
    reward: bool
    chained: bool = True


@runtime_checkable
class Planned(Protocol):
    """An estimator the memory planner (rlr_cli/plan.py) knows: the graphs its loss terms hold, one at a time."""

    def graphs(self, num_steps: int) -> list[Graph]: ...


@runtime_checkable
class Stateful(Protocol):
    """An estimator with state a checkpoint must carry (e.g. DDPO's per-prompt statistics)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# ---- the rest of a run ----------------------------------------------------------------------------
class Prompts(Protocol):
    def sample(self, n: int, generator: torch.Generator) -> list[str]:
        """n training prompts drawn with the run's generator."""
        ...

    def eval_prompts(self, n: int) -> list[str]:
        """The first n held-out prompts (fixed)."""
        ...

    def distinct(self) -> list[str]:
        """Every prompt the source hands out, training and held-out, once each."""
        ...


class OptimizerFactory(Protocol):
    def build(self, params: list[torch.nn.Parameter], max_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """-> (optimizer, LR scheduler stepped once per optimizer step)."""
        ...


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None: ...

    def close(self) -> None: ...


class LoggerFactory(Protocol):
    def open(self, run_dir: Path, config: dict) -> Logger: ...
