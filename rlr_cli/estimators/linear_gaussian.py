"""A linear-Gaussian chain whose reward gradient is known in closed form, for checking estimators.

x_T ~ N(0, I_d); transition i: x_{i+1} = a_i x_i + c_i f_i(x_i) + sigma_i z_i with the "network"
f_i(x) = W x + b_i (W (d,d) shared, b (T,d) per step: the trainable parameters). Every sigma_i > 0,
so the on-policy likelihood ratio is defined at every step. The DDIM-like problem: c_i = 1, sigma_i
geometric from `sigma_first` at i = 0 down to `sigma_last` at the last step. The flow problem
(`on_flow_chain`): a linear velocity field f = v, with a_i, c_i, sigma_i the flow SDE's own coefficients
(sampling.FlowChain: mean = x_coef x + v_coef v). With A_i = a_i I + c_i W, x_0 ~ N(m, S):
    m <- A_i m + c_i b_i,   S <- A_i S A_i^T + sigma_i^2 I   (from m = 0, S = I),
and for the quadratic reward R(y) = -1/2 (y - c)^T Q (y - c), Q = diag(q):
    J = E[R] = -1/2 (tr(Q S) + (m - c)^T Q (m - c)),
a polynomial in (W, b) that autograd differentiates exactly (no sampling). decode is the identity.

Latents are (B, d); a rollout's latents are (B, T+1, d).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from rlr_cli.interfaces import Rollout, Transition
from rlr_cli.sampling import FlowChain, as_steps, gaussian_log_prob, start_noise

NO_REFERENCE = "the linear-Gaussian chain has no reference policy (KL regularisation is checked on the tiny UNet)"


class QuadraticReward:
    """R(y) = -1/2 sum_k q_k (y_k - c_k)^2; y (B,d) -> (B,). Differentiable."""

    differentiable = True

    def __init__(self, target: Tensor, weights: Tensor):
        self.target, self.weights = target, weights

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return -0.5 * (self.weights * (images - self.target) ** 2).sum(dim=1)


class LinearChain:
    """The chain's noise scales as an interfaces.Chain (its means are the policy's own affine maps)."""

    guidance_scale = None

    def __init__(self, sigmas: list[float]):
        self.num_steps = len(sigmas)
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self.timesteps = torch.arange(self.num_steps, 0, -1)

    def adapters(self, i: int) -> tuple[str, ...]:
        return ()

    def std(self, steps: Tensor) -> Tensor:
        return self.sigmas[steps]

    def mean(self, steps: Tensor, x: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError("the linear-Gaussian policy computes its means itself")

    predict_x0 = mean

    def noised(self, steps: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        raise NotImplementedError("the linear-Gaussian chain has no forward process q(x_t | x_0) to re-noise x_0 with")

    def resampled(self, num_steps: int | None, eta: float | None, guidance_scale: float | None) -> LinearChain:
        raise NotImplementedError("the linear-Gaussian chain has one schedule")


class LinearGaussianPolicy(torch.nn.Module):
    """The chain above as a Policy (float64, CPU); `exact_gradient(reward)` gives grad J in closed form."""

    def __init__(
        self,
        dim: int = 4,
        num_steps: int = 12,
        decay: float = 0.9,
        sigma_first: float = 0.6,
        sigma_last: float = 0.05,
        seed: int = 0,
    ):
        super().__init__()
        init = torch.Generator().manual_seed(seed)
        self.num_steps, self.dim = num_steps, dim
        self.decay = [decay] * num_steps
        self.scales = [1.0] * num_steps  # c_i
        ratio = sigma_last / sigma_first
        self.sigmas = [sigma_first * ratio ** (i / max(num_steps - 1, 1)) for i in range(num_steps)]
        self.chain = LinearChain(self.sigmas)
        self.weight = torch.nn.Parameter(0.1 * torch.randn(dim, dim, generator=init, dtype=torch.float64))
        self.bias = torch.nn.Parameter(0.2 * torch.randn(num_steps, dim, generator=init, dtype=torch.float64))

    @classmethod
    def on_flow_chain(cls, chain: FlowChain, dim: int = 4, seed: int = 0) -> LinearGaussianPolicy:
        """The flow SDE chain's transitions (every step stochastic) with a linear velocity field."""
        policy = cls(dim=dim, num_steps=chain.num_steps, seed=seed)
        policy.decay, policy.scales = chain.x_coef.tolist(), chain.v_coef.tolist()
        policy.sigmas = chain.std(torch.arange(chain.num_steps)).tolist()
        policy.chain = LinearChain(policy.sigmas)
        return policy

    # -- the chain ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.weight, self.bias]

    def _net(self, i: int, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias[i]

    def _mean(self, i: int, x: Tensor, network_grad: bool = True) -> Tensor:
        if network_grad:
            f = self._net(i, x)
        else:
            with torch.no_grad():
                f = self._net(i, x)
        return self.decay[i] * x + self.scales[i] * f

    def _means(self, steps: Tensor, x: Tensor) -> Tensor:
        """Each sample's mean at its own step, (B,) steps, x (B,d)."""
        decay = torch.tensor(self.decay, dtype=x.dtype)[steps][:, None]
        scale = torch.tensor(self.scales, dtype=x.dtype)[steps][:, None]
        return decay * x + scale * (x @ self.weight.T + self.bias[steps])

    def sample(self, prompts: Sequence[str], *, generator: torch.Generator, grad_steps: Sequence[int] = (),
               chain=None, kl: bool = False, shared_start: int = 1, keep_x0: bool = False) -> Rollout:
        """B = len(prompts) trajectories; steps outside grad_steps detach f_i but keep d/dx of a_i x."""
        if kl:
            raise NotImplementedError(NO_REFERENCE)
        with_grad, b = set(grad_steps), len(prompts)
        x = start_noise((b, self.dim), shared_start, generator, torch.float64)
        latents, noises, log_probs, x0s = [x], [], [], []
        for i in range(self.num_steps):
            if keep_x0:
                with torch.no_grad():
                    x0s.append(self.predict_x0(None, i, x))  # the noise-free chain to the end: this chain's x0-hat
            z = torch.randn(b, self.dim, generator=generator, dtype=torch.float64)
            mean = self._mean(i, x, network_grad=i in with_grad)
            x = mean + self.sigmas[i] * z
            latents.append(x)
            noises.append(z)
            log_probs.append(gaussian_log_prob(x, mean.detach(), self.chain.std(as_steps(i, b))))
        return Rollout(
            latents=torch.stack(latents, dim=1),
            noises=torch.stack(noises, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            chain=self.chain,
            cond=None,
            prompts=list(prompts),
            x0_predictions=torch.stack(x0s, dim=1) if keep_x0 else None,
        )

    def transition(self, rollout: Rollout, i: int, x: Tensor, noise: Tensor | None = None) -> Transition:
        noise = rollout.noises[:, i] if noise is None else noise
        mean = self._mean(i, x)
        return Transition(sample=mean + self.sigmas[i] * noise, mean=mean, std=self.chain.std(as_steps(i, x.shape[0])))

    def step_log_prob(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> Tensor:
        b = rollout.latents.shape[0]
        steps = as_steps(steps, b)
        rows = torch.arange(b)
        mean = self._means(steps, rollout.latents[rows, steps].detach())
        return gaussian_log_prob(rollout.latents[rows, steps + 1], mean, self.chain.std(steps), reduce)

    def step_log_prob_kl(self, rollout: Rollout, steps: int | Tensor, reduce: str = "mean") -> tuple[Tensor, Tensor]:
        raise NotImplementedError(NO_REFERENCE)

    def predict_x0(self, rollout: Rollout | None, i: int, x: Tensor) -> Tensor:
        """The noise-free chain from the input of transition i to the end."""
        for k in range(i, self.num_steps):
            x = self._mean(k, x)
        return x

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    def save_adapter(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, "linear_gaussian.safetensors"))

    def load_adapter(self, directory: str) -> None:
        from safetensors.torch import load_file

        self.load_state_dict(load_file(os.path.join(directory, "linear_gaussian.safetensors")))

    # -- closed form -------------------------------------------------------------------------------
    def moments(self) -> tuple[Tensor, Tensor]:
        """Mean (d,) and covariance (d,d) of x_0, as differentiable functions of the parameters."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        m, s = torch.zeros(self.dim, dtype=torch.float64), eye
        for i in range(self.num_steps):
            a = self.decay[i] * eye + self.scales[i] * self.weight
            m = a @ m + self.scales[i] * self.bias[i]
            s = a @ s @ a.T + self.sigmas[i] ** 2 * eye
        return m, s

    def exact_objective(self, reward: QuadraticReward) -> Tensor:
        m, s = self.moments()
        q, c = reward.weights, reward.target
        return -0.5 * ((q * torch.diagonal(s)).sum() + (q * (m - c) ** 2).sum())

    def exact_gradient(self, reward: QuadraticReward) -> list[Tensor]:
        """grad J w.r.t. trainable_parameters(), exact."""
        return list(torch.autograd.grad(self.exact_objective(reward), self.trainable_parameters()))


def quadratic_reward() -> QuadraticReward:
    return QuadraticReward(target=torch.tensor([1.0, -0.5, 0.5, 0.0], dtype=torch.float64),
                           weights=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64))


def default_problem(seed: int = 0) -> tuple[LinearGaussianPolicy, QuadraticReward]:
    """The reference problem of ESTIMATORS.md: d = 4, T = 12, sigma 0.6 -> 0.05, a fixed quadratic reward."""
    return LinearGaussianPolicy(seed=seed), quadratic_reward()


def flow_problem(seed: int = 0, num_steps: int = 10, eta: float = 0.7) -> tuple[LinearGaussianPolicy, QuadraticReward]:
    """The flow reference problem: SD3.5's scheduler (shift 3) at T = 10, Flow-GRPO's noise level 0.7, a linear
    velocity field, the same quadratic reward."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    chain = FlowChain(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), num_steps, eta)
    return LinearGaussianPolicy.on_flow_chain(chain, seed=seed), quadratic_reward()
