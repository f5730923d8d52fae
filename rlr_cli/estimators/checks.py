"""Drawing many gradient estimates and comparing them with a known gradient (tests, diagnostics, bench).

Statistics of N independent estimates g_1..g_N (each the gradient of J = E[U], i.e. minus the gradient
of the estimator's loss) against a reference g:
  rel_bias     ||mean - g|| / ||g||
  rel_bias_se  sqrt(tr Cov(g_hat) / N + tr Cov(ref) / N_ref) / ||g||: the root-mean-square size of the
               noise in mean - g. For an unbiased estimator E[rel_bias^2] = rel_bias_se^2, so
               rel_bias / rel_bias_se is about 1 (and > 3 with negligible probability); a bias b adds
               in quadrature, rel_bias^2 ~ b^2 + se^2. (The delta method degenerates at zero bias: its
               direction is random there, so it is not used.)
  variance     E||g_hat - mean||^2 (total variance, trace of the covariance); variance_se its standard
               error (of the mean of the N squared deviations), to compare two estimators' variances
  cosine       cos(mean, g)
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import Tensor

from rlr_cli.interfaces import BufferedEstimator, Estimator, EstimatorOutput, Policy, Reward


def flat_gradient(params: Sequence[torch.nn.Parameter]) -> Tensor:
    """The parameters' .grad as one vector (zeros where None), float64."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten() for p in params])


class SavedTensorMeter:
    """Peak bytes of tensors alive in autograd graphs (saved for backward), via saved_tensors_hooks.

    Counts what pack hooks see; activations inside a non-reentrant checkpoint are not saved and not
    counted (only the recomputation during backward, which runs under the meter too when it is active).
    Excludes parameters, optimizer state and transient forward buffers.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0

    @contextmanager
    def measure(self):
        meter = self

        class Packed:
            __slots__ = ("tensor", "nbytes", "__weakref__")

            def __init__(self, tensor: Tensor):
                self.tensor, self.nbytes = tensor, tensor.numel() * tensor.element_size()
                meter.live += self.nbytes
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= self.nbytes

        with torch.autograd.graph.saved_tensors_hooks(Packed, lambda packed: packed.tensor):
            yield self


def estimate(estimator: Estimator | BufferedEstimator, policy: Policy, reward: Reward, prompts: Sequence[str],
             generator: torch.Generator) -> EstimatorOutput:
    """One gradient estimate into the trainable weights' .grad, backward as the trainer's (without scaling).

    A buffered estimator collects a fresh batch and runs its first update (on-policy).
    """
    def backward(term: Tensor) -> None:
        term.backward()

    if isinstance(estimator, BufferedEstimator):
        update = estimator.collect(policy, reward, prompts, generator)[0]
        return estimator.update(policy, reward, update, backward)
    return estimator(policy, reward, prompts, generator, backward)


def draw_estimates(
    estimator: Estimator | BufferedEstimator, policy: Policy, reward: Reward, prompts: Sequence[str], n: int,
    seed: int = 0, meter: bool = False,
) -> tuple[Tensor, float, float]:
    """N estimates of grad J (N, P) from one generator seeded `seed`; seconds per estimate; peak MB.

    Peak MB: torch.cuda.max_memory_allocated on CUDA, else SavedTensorMeter (when meter is True).
    """
    params = policy.trainable_parameters()
    generator = torch.Generator().manual_seed(seed)
    cuda = params[0].is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    saved = SavedTensorMeter()
    estimates, start = [], time.perf_counter()
    for _ in range(n):
        for p in params:
            p.grad = None
        if meter and not cuda:
            with saved.measure():
                estimate(estimator, policy, reward, prompts, generator)
        else:
            estimate(estimator, policy, reward, prompts, generator)
        estimates.append(-flat_gradient(params))
    seconds = (time.perf_counter() - start) / n
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else saved.peak / 2**20
    for p in params:
        p.grad = None
    return torch.stack(estimates), seconds, peak


def bias_statistics(estimates: Tensor, g: Tensor, reference: Tensor | None = None) -> dict[str, float]:
    """rel_bias, rel_bias_se, variance (tr Cov, with its standard error), cosine of estimates (N,P) against g (P,).

    reference: the (N_ref, P) draws g is the mean of, when g is itself estimated; their noise enters the SE.
    """
    n = estimates.shape[0]
    mean = estimates.mean(dim=0)
    variance = estimates.var(dim=0).sum()
    squared = ((estimates - mean) ** 2).sum(dim=1) * n / max(n - 1, 1)  # their mean is `variance`
    noise = variance / n
    if reference is not None:
        noise = noise + reference.var(dim=0).sum() / reference.shape[0]
    norm = g.norm()
    return {
        "rel_bias": float((mean - g).norm() / norm),
        "rel_bias_se": float(noise.sqrt() / norm),
        "variance": float(variance),
        "variance_se": float(squared.std() / n**0.5) if n > 1 else float("nan"),
        "cosine": float(torch.nn.functional.cosine_similarity(mean, g, dim=0)),
    }


def projected_bias(estimates: Tensor, reference: Tensor) -> dict[str, float]:
    """Relative bias along the reference's direction, with its SE (a scalar t-test; far more power).

    An unbiased estimator is unbiased along any fixed direction v. v comes from the first half of the
    reference draws, g.v from the second half, so v is independent of everything it is compared with:
      rel_bias = (mean(G) . v - mean(R2) . v) / (mean(R2) . v),  SE from the variances of G.v and R2.v.
    """
    half = reference.shape[0] // 2
    v = reference[:half].mean(dim=0)
    v = v / v.norm()
    est, ref = estimates @ v, reference[half:] @ v
    scale = ref.mean().abs()
    return {
        "rel_bias_v": float((est.mean() - ref.mean()) / scale),
        "rel_bias_v_se": float((est.var() / est.numel() + ref.var() / ref.numel()).sqrt() / scale),
    }
