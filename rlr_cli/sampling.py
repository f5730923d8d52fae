"""The sampling chains with their Gaussian transitions, and the log-density.

DDIM (as in DDPO, kvablack/ddpo-pytorch), for noise-predicting UNets (SD 1.x, SDXL):
x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps + std * z, with
std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).

Flow matching as an SDE (Flow-GRPO, yifan123/flow_grpo sd3_sde_with_logprob.py), for velocity-predicting
transformers (SD3, FLUX): with sigma the step's noise level, dt = sigma_next - sigma < 0 and
s = eta * sqrt(sigma / (1 - sigma)) (eta: Flow-GRPO's noise_level a),
x_next = x (1 + s^2 / (2 sigma) dt) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt + s sqrt(-dt) z;
eta = 0 is the scheduler's Euler step x + v dt. DanceGRPO's SDE (XueZeyue/DanceGRPO train_grpo_flux.py
flux_step, its score estimate written out) is the same step with a constant s = eta.

Per-step coefficients are computed once in float64 and gathered per sample, so a batch whose samples
sit at different transitions runs in one call, with the same numbers as one step at a time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


def column(values: Tensor, like: Tensor) -> Tensor:
    """(B,) float64 per-sample values -> (B, 1, ..., 1) in like's dtype and device, to broadcast over like."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def per_sample(table: Tensor, steps: Tensor, like: Tensor) -> Tensor:
    """table (T,) float64 of per-step coefficients, steps (B,) -> (B, 1, ..., 1) like `column`."""
    return column(table[steps], like)


def as_steps(steps: int | Tensor, batch: int) -> Tensor:
    """A transition index for every sample: an int (all the same) or (B,) indices -> (B,) int64 on the CPU."""
    if isinstance(steps, int):
        return torch.full((batch,), steps, dtype=torch.long)
    return steps.long().cpu()


class DDIMChain:
    """A DDIM schedule of T inference steps; transition i goes from timesteps[i] to the next timestep."""

    guidance_scale: float | None = None  # the policy's own

    def __init__(self, scheduler, num_steps: int, eta: float):
        self.scheduler_config = scheduler.config
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.clone().cpu()  # (T,) descending
        self.num_steps, self.eta = num_steps, eta
        self.alphas_cumprod = alphas = scheduler.alphas_cumprod.double().cpu()  # (1000,) of the training schedule
        self.final_alpha = float(scheduler.final_alpha_cumprod)
        step_ratio = scheduler.config.num_train_timesteps // num_steps
        a_t, a_prev, std = [], [], []
        for t in self.timesteps.tolist():
            a = float(alphas[t])
            prev = float(alphas[t - step_ratio]) if t - step_ratio >= 0 else self.final_alpha
            variance = (1 - prev) / (1 - a) * (1 - a / prev)
            a_t.append(a)
            a_prev.append(prev)
            std.append(eta * math.sqrt(max(variance, 0.0)))
        table = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
        self._std = table(std)
        self._sqrt_a = table([math.sqrt(a) for a in a_t])
        self._sqrt_one_minus_a = table([math.sqrt(1 - a) for a in a_t])
        self._sqrt_a_prev = table([math.sqrt(a) for a in a_prev])
        self._eps_coef = table([math.sqrt(max(1 - p - s**2, 0.0)) for p, s in zip(a_prev, std)])

    def resampled(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> DDIMChain:
        """The same schedule sampled with other settings (held-out evaluation's own); None keeps this chain's
        value (guidance: the policy's)."""
        from diffusers import DDIMScheduler

        chain = DDIMChain(DDIMScheduler.from_config(self.scheduler_config), num_steps or self.num_steps,
                          self.eta if eta is None else eta)
        chain.guidance_scale = guidance_scale
        return chain

    def adapters(self, i: int) -> tuple[str, ...]:
        return ()

    def std(self, steps: Tensor) -> Tensor:
        return self._std[steps]

    def predict_x0(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        return (x - per_sample(self._sqrt_one_minus_a, steps, x) * out) / per_sample(self._sqrt_a, steps, x)

    def noised(self, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        return per_sample(self._sqrt_a, steps, x0) * x0 + per_sample(self._sqrt_one_minus_a, steps, x0) * noise

    def mean(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """Mean of x_prev given x (B,C,H,W) at each sample's step and the noise prediction (B,C,H,W)."""
        x0 = self.predict_x0(steps, x, out)
        return per_sample(self._sqrt_a_prev, steps, x) * x0 + per_sample(self._eps_coef, steps, x) * out


class FlowChain:
    """A flow-matching schedule of T steps (the scheduler's shifted sigmas), sampled as Flow-GRPO's SDE on the
    steps of `sde_window` [start, stop) (every step when None) and as the Euler ODE elsewhere (MixGRPO /
    Flow-GRPO-Fast). The model's output is the velocity v; x0_hat = x - sigma v."""

    guidance_scale: float | None = None  # the policy's own

    def __init__(self, scheduler, num_steps: int, eta: float, sde_window: tuple[int, int] | None = None,
                 image_seq_len: int | None = None, linear_sigmas: bool = False, sde_type: str = "flow_grpo"):
        """image_seq_len: latent tokens, for the resolution-dependent shift of schedulers with dynamic shifting;
        linear_sigmas: start from linspace(1, 1/T) as FluxPipeline does (SD3's pipeline lets the scheduler);
        sde_type: flow_grpo (s = eta sqrt(sigma / (1 - sigma))) | dance_grpo (s = eta)."""
        if sde_type not in ("flow_grpo", "dance_grpo"):
            raise ValueError(f"sde_type {sde_type!r}: flow_grpo | dance_grpo")
        self.scheduler_config = scheduler.config
        self.num_steps, self.eta, self.sde_window, self.sde_type = num_steps, eta, sde_window, sde_type
        self.image_seq_len, self.linear_sigmas = image_seq_len, linear_sigmas
        scheduler.set_timesteps(num_steps, **flow_schedule(scheduler.config, num_steps, image_seq_len, linear_sigmas))
        self.timesteps = scheduler.timesteps.clone().cpu()  # (T,) sigma * num_train_timesteps, descending
        sigmas = scheduler.sigmas.double().cpu()  # (T+1,), the last 0
        start, stop = sde_window or (0, num_steps)
        sigma, dt = sigmas[:-1], sigmas[1:] - sigmas[:-1]
        # at sigma = 1 the SDE's std is infinite; Flow-GRPO divides by 1 - sigmas[1] there instead
        denominator = 1 - torch.where(sigma == 1, sigmas[1] if num_steps > 1 else 0.0, sigma)
        s = eta * (torch.sqrt(sigma / denominator) if sde_type == "flow_grpo" else torch.ones_like(sigma))
        s[:start], s[stop:] = 0.0, 0.0
        self._sigma = sigma
        # mean = x_coef * x + v_coef * v per step (T,) float64: the closed-form check's linear chain reads them
        self.x_coef = 1 + s**2 / (2 * sigma) * dt
        self.v_coef = (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        self._std = s * torch.sqrt(-dt)

    def resampled(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> FlowChain:
        """The same schedule sampled with other settings (held-out evaluation: the SDE everywhere or nowhere)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        window = self.sde_window if num_steps in (None, self.num_steps) else None  # its indices are of T steps
        chain = FlowChain(FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
                          num_steps or self.num_steps, self.eta if eta is None else eta, window, self.image_seq_len,
                          self.linear_sigmas, self.sde_type)
        chain.guidance_scale = guidance_scale
        return chain

    def adapters(self, i: int) -> tuple[str, ...]:
        return ()

    def std(self, steps: Tensor) -> Tensor:
        return self._std[steps]

    def predict_x0(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        return x - per_sample(self._sigma, steps, x) * out

    def noised(self, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        sigma = per_sample(self._sigma, steps, x0)
        return (1 - sigma) * x0 + sigma * noise

    def mean(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        """Mean of x_next given x and the velocity (B,C,H,W), in float32 (bf16 overflows here, Flow-GRPO notes)."""
        x, out = x.float(), out.float()
        return per_sample(self.x_coef, steps, x) * x + per_sample(self.v_coef, steps, x) * out


def flow_schedule(config, num_steps: int, image_seq_len: int | None, linear_sigmas: bool) -> dict:
    """set_timesteps' keyword arguments as the SD3 / FLUX pipelines pass them: sigmas, and mu for dynamic shift."""
    import numpy as np

    kwargs: dict = {}
    if linear_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
    if config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("a scheduler with dynamic shifting needs the image's latent sequence length")
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (top - base)  # diffusers' calculate_shift, in its order of operations
        kwargs["mu"] = image_seq_len * slope + (low - slope * base)
    return kwargs


def stochastic_steps(chain) -> Tensor:
    """(n,) int64 indices of the chain's transitions with std > 0: those with a log-density (all of them
    for DDIM with eta > 0; the SDE window of a flow chain)."""
    return torch.nonzero(chain.std(torch.arange(chain.num_steps)) > 0).flatten()


def start_noise(shape: tuple[int, ...], shared: int, generator: torch.Generator,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """x_T (B, ...) ~ N(0, I); with shared > 1 each run of `shared` consecutive samples gets the same draw."""
    if shared == 1:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if shape[0] % shared:
        raise ValueError(f"a batch of {shape[0]} does not split into runs of {shared}")
    draws = torch.randn((shape[0] // shared, *shape[1:]), generator=generator, dtype=dtype)
    return draws.repeat_interleave(shared, dim=0)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per sample, x (B,...) treated as data, std (B,) float64 -> (B,),
    averaged over dims (DDPO's convention) or summed (the true log-density)."""
    if bool((std <= 0).any()):
        raise ValueError("log-probability of a deterministic step (std = 0) is undefined")
    two_var, log_std = column(2 * std**2, mean), column(torch.log(std), mean)
    log_prob = -((x.detach() - mean) ** 2) / two_var - log_std - 0.5 * math.log(2 * math.pi)
    log_prob = log_prob.flatten(1)
    return log_prob.mean(dim=1) if reduce == "mean" else log_prob.sum(dim=1)


def map_batch(structures: Sequence[Any], fn: Callable[[list[Tensor]], Tensor], b: int) -> Any:
    """Structures of one shape (a tensor, or a tuple / list / dict / dataclass of them, e.g. a conditioning)
    -> that shape with fn applied to the tensors at each place whose first dim is b (the batch); any other
    leaf (a shared tensor of another first dim, an int) is the first structure's."""
    first = structures[0]
    if torch.is_tensor(first):
        return fn(list(structures)) if first.dim() > 0 and first.shape[0] == b else first
    if isinstance(first, (list, tuple)):
        return type(first)(map_batch(parts, fn, b) for parts in zip(*structures))
    if isinstance(first, dict):
        return {k: map_batch([s[k] for s in structures], fn, b) for k in first}
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: map_batch([getattr(s, f.name) for s in structures], fn, b)
                                             for f in dataclasses.fields(first) if f.init})
    return first
