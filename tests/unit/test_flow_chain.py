"""The flow-matching SDE chain (sampling.FlowChain) against diffusers' FlowMatchEulerDiscreteScheduler and
torch.distributions: eta 0 is the scheduler's own Euler step, the transition's log-density is the Gaussian's."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rlr_cli.sampling import FlowChain, as_steps, gaussian_log_prob

SD3: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)  # stable-diffusion-3.5-medium's scheduler config
FLUX: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's


def chains(num_steps: int, eta: float, **kwargs) -> dict[str, tuple[FlowChain, Any]]:
    """The SD3 chain and the FLUX chain at 1024 latent tokens, each beside diffusers' scheduler set up as the
    SD3 / FLUX pipeline sets it up."""
    sd3: Any = FlowMatchEulerDiscreteScheduler(**SD3)
    sd3.set_timesteps(num_steps)
    flux: Any = FlowMatchEulerDiscreteScheduler(**FLUX)
    flux.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(1024))  # as FluxPipeline
    return {
        "sd3": (FlowChain(FlowMatchEulerDiscreteScheduler(**SD3), num_steps, eta, **kwargs), sd3),
        "flux": (FlowChain(FlowMatchEulerDiscreteScheduler(**FLUX), num_steps, eta, image_seq_len=1024,
                           linear_sigmas=True, **kwargs), flux),
    }


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_noise_level_zero_is_the_schedulers_euler_step(family):
    chain, scheduler = chains(10, eta=0.0)[family]
    assert torch.equal(chain.timesteps, scheduler.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        expected = scheduler.step(v, t, x).prev_sample
        got = chain.mean(as_steps(i, 2), x, v)
        assert float(chain.std(as_steps(i, 2)).max()) == 0.0
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        x = expected


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transition_log_density_is_the_gaussians(family):
    chain, scheduler = chains(10, eta=0.7)[family]
    sigmas = scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(1)
    for i in (0, 4, 9):
        steps = as_steps(i, 3)
        x, v = torch.randn((3, 4, 8, 8), generator=gen), torch.randn((3, 4, 8, 8), generator=gen)
        mean, std = chain.mean(steps, x, v), chain.std(steps)
        sigma, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        level = 0.7 * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))  # Flow-GRPO's std_dev_t
        assert float(std[0]) == pytest.approx(level * math.sqrt(-dt), rel=1e-12)
        x_next = mean + std[0].float() * torch.randn(x.shape, generator=gen)
        exact = torch.distributions.Normal(mean.double(), float(std[0])).log_prob(x_next.double()).flatten(1)
        torch.testing.assert_close(gaussian_log_prob(x_next, mean, std, "sum").double(), exact.sum(1), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gaussian_log_prob(x_next, mean, std).double(), exact.mean(1), rtol=1e-5, atol=1e-5)


def test_sde_window_is_the_ode_outside_it():
    sde, _ = chains(10, eta=0.7, sde_window=(2, 5))["sd3"]
    ode, _ = chains(10, eta=0.0)["sd3"]
    x, v = torch.randn((2, 4, 8, 8)), torch.randn((2, 4, 8, 8))
    for i in range(10):
        inside = 2 <= i < 5
        assert (float(sde.std(as_steps(i, 1))[0]) > 0) == inside
        same = torch.allclose(sde.mean(as_steps(i, 2), x, v), ode.mean(as_steps(i, 2), x, v))
        assert same != inside


def test_x0_prediction_and_forward_process_invert_each_other():
    chain, _ = chains(10, eta=0.7)["sd3"]
    x0, noise = torch.randn((2, 4, 8, 8)), torch.randn((2, 4, 8, 8))
    for i in (0, 3, 9):
        steps = as_steps(i, 2)
        x = chain.noised(steps, x0, noise)
        torch.testing.assert_close(chain.predict_x0(steps, x, noise - x0), x0, atol=1e-5, rtol=1e-5)


def test_resampled_keeps_what_is_not_given():
    chain, _ = chains(10, eta=0.7, sde_window=(0, 4))["sd3"]
    same = chain.resampled(None, None, 2.0)
    assert same.num_steps == 10 and same.eta == 0.7 and same.sde_window == (0, 4) and same.guidance_scale == 2.0
    longer = chain.resampled(40, 0.0, None)
    assert longer.num_steps == 40 and longer.sde_window is None and float(longer.std(torch.arange(40)).max()) == 0.0


def test_dance_grpo_sde_is_dancegrpos_flux_step():
    """sde_type=dance_grpo on a static shift 3 (DanceGRPO's FLUX schedule: shift(linspace(1, 0, T + 1))) against
    DanceGRPO's flux_step written out: mean = x + dsigma v - 0.5 eta^2 score dsigma, std = eta sqrt(-dsigma)."""
    steps, eta = 16, 0.3
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    chain = FlowChain(scheduler, steps, eta, linear_sigmas=True, sde_type="dance_grpo")
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = 3 * t / (1 + 2 * t)  # DanceGRPO's sd3_time_shift(3, t)
    gen = torch.Generator().manual_seed(2)
    for i in (0, 7, 15):
        x, v = torch.randn((2, 4, 8, 8), generator=gen), torch.randn((2, 4, 8, 8), generator=gen)
        sigma, dsigma = float(sigmas[i]), float(sigmas[i + 1] - sigmas[i])
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma**2
        expected = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
        torch.testing.assert_close(chain.mean(as_steps(i, 2), x, v), expected, atol=1e-5, rtol=1e-5)
        assert float(chain.std(as_steps(i, 1))[0]) == pytest.approx(eta * math.sqrt(-dsigma), rel=1e-6)
