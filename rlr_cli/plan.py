"""The memory planner: `trainer.plan=true` and `estimator.h=auto`.

A probe on the run's own policy, reward and batch size runs the calls a training step is made of, each with
its backward, and measures the peak memory above what was resident before it (bytes; CUDA: the allocator's
peak; CPU: the peak resident set, Linux):
  B_z     what the rollout keeps per transition (latents, noises, x0 predictions: the no-grad calls' residue)
  single  one differentiated denoiser call on its own (step_log_prob, RLR's HO at h = 1 and ZO)
  chain   chains of 1 and 3 differentiated calls (transition, checkpointed as the model asks), alone and into
          the decoder + reward: half their difference is B_h, the cost of one more call in a chain
The estimate: weights + trainable weights x (grad + AdamW's 2 moments [+ EMA]) + T B_z + the largest graph one
loss term holds (each term's graph is freed by its own backward), a chain of n calls costing chain(1) +
(n - 1) B_h. This is the RLR paper's rule B_h h + B_z (T - 1 - h) <= B [secondhand] with measured terms.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlr_cli.errors import UserError
from rlr_cli.estimators.common import score
from rlr_cli.interfaces import Graph, Planned, Reward
from rlr_cli.sampling import gaussian_log_prob

GB = 1e9


@dataclass(frozen=True)
class Costs:
    """Peak memory of each kind of call of the run (bytes above the resident before it), measured by `probe`."""

    weights: int  # every module of the pipeline, frozen and trainable
    trainable: int
    per_step: int  # B_z
    single: int  # one call on its own, with backward
    chain: tuple[int, int]  # chains of 1 and `length` calls, with backward
    chain_reward: tuple[int, int]  # the same into the decoder + reward
    device: str
    length: int = 3  # the longer probe chain (3, or T when shorter)

    def graph(self, g: Graph) -> int:
        if not g.chained:
            return g.calls * self.single
        one, longer = self.chain_reward if g.reward else self.chain
        return one + max(g.calls - 1, 0) * max(longer - one, 0) // max(self.length - 1, 1)

    @property
    def per_call(self) -> int:
        """B_h: one more call in a chain."""
        return max(self.chain[1] - self.chain[0], 0) // max(self.length - 1, 1)


@dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # name -> bytes; their sum is the peak

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def line(self) -> str:
        return f"{self.total / GB:.3g} GB (" + ", ".join(f"{k} {v / GB:.3g}" for k, v in self.parts.items() if v) + ")"


def peak_above_resident(device: torch.device) -> Callable[[Callable[[], object]], int]:
    """A meter: fn -> the peak bytes fn's run held above what was resident before it (the smaller of two runs:
    a first call's one-off allocations, such as caches built on first use, are not the step's)."""
    if device.type == "cuda":
        def cuda(fn: Callable[[], object]) -> int:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        return cuda
    status, clear = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not (status.exists() and clear.exists()):
        raise UserError("trainer.plan / estimator.h=auto on the CPU reads the peak resident set from /proc (Linux); "
                        "run it on Linux or on a GPU")
    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def kb(field: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def cpu(fn: Callable[[], object]) -> int:
        trim(0)  # freed heap goes back, so the peak counts fn's own memory
        before = kb("VmRSS")
        clear.write_text("5")  # VmHWM := VmRSS
        fn()
        return kb("VmHWM") - before
    return cpu


def probe(policy, reward: Reward, prompts: list[str], keep_x0: bool) -> Costs:
    """Measure the costs on one no-grad rollout of the policy's own chain (its trajectories are not charged
    to the run's sample budget); every backward goes to autograd.grad, so no .grad is left behind."""
    meter = peak_above_resident(policy.device)

    def measure(fn: Callable[[], object]) -> int:
        return min(meter(fn), meter(fn))

    tensors = [t for m in policy.family.modules() for t in (*m.parameters(), *m.buffers())]
    weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    params = policy.trainable_parameters()
    sampled = policy.trajectories_sampled
    with torch.no_grad():
        rollout = policy.sample(prompts, generator=torch.Generator().manual_seed(0), keep_x0=keep_x0)
    policy.trajectories_sampled = sampled
    t = policy.num_steps
    kept = [rollout.latents, rollout.noises, rollout.log_probs, *([rollout.x0_predictions] if keep_x0 else [])]
    per_step = sum(x.numel() * x.element_size() for x in kept if x is not None) // t

    def backward(loss: torch.Tensor) -> None:
        torch.autograd.grad(loss, params, allow_unused=True)

    def chain(n: int, into_reward: bool) -> None:
        start = max(t - n, 0)
        x = rollout.latents[:, start]
        for i in range(start, min(start + n, t)):
            last = policy.transition(rollout, i, x)
            x = last.sample
        if into_reward:
            backward(score(policy, reward, x, rollout.prompts).sum())
        else:
            backward(gaussian_log_prob(rollout.latents[:, start + n], last.mean, last.std, reduce="sum").sum())

    single = measure(lambda: backward(policy.step_log_prob(rollout, t - 1, reduce="sum").sum()))
    lengths = (1, min(3, t))
    return Costs(weights=weights, trainable=sum(p.numel() * p.element_size() for p in params), per_step=per_step,
                 single=single, chain=tuple(measure(lambda n=n: chain(n, False)) for n in lengths),  # type: ignore[arg-type]
                 chain_reward=tuple(measure(lambda n=n: chain(n, True)) for n in lengths),  # type: ignore[arg-type]
                 device=str(policy.device), length=lengths[1])


def estimate(costs: Costs, graphs: list[Graph], num_steps: int, ema: bool) -> Estimate:
    """The step's peak: everything resident plus the largest graph (each term's is freed by its backward)."""
    return Estimate({
        "weights": costs.weights,
        "grads + AdamW": 3 * costs.trainable,
        "EMA": costs.trainable if ema else 0,
        f"rollout ({num_steps} x B_z)": num_steps * costs.per_step,
        "largest graph": max((costs.graph(g) for g in graphs), default=0),
    })


def describe(costs: Costs, graphs: list[Graph], num_steps: int, batch: int, ema: bool) -> str:
    """The plan as `trainer.plan=true` prints it."""
    mb = 2**20
    lines = [f"plan on {costs.device}, batch {batch}, T = {num_steps}:",
             f"  measured: B_h {costs.per_call / mb:.1f} MB per chained call, B_z {costs.per_step / mb:.2f} MB per "
             f"no-grad call; one call on its own {costs.single / mb:.1f} MB, one chained into the reward "
             f"{costs.chain_reward[0] / mb:.1f} MB (each with its backward)"]
    for g in graphs:
        calls = f"{g.calls} chained call{'s' * (g.calls != 1)}" if g.chained else f"{g.calls} call on its own"
        lines.append(f"  graph {g.what}: {calls}{' + decoder + reward' if g.reward else ''}: {costs.graph(g) / mb:.1f} MB")
    lines.append(f"  estimated peak: {estimate(costs, graphs, num_steps, ema).line()}")
    return "\n".join(lines)


def auto_h(estimator, costs: Costs, num_steps: int, budget_gb: float, ema: bool) -> str:
    """Set estimator.h to the largest h that fits the budget (the peak grows with h); the one line that says why."""
    k = estimator.fo_steps
    last = num_steps - k - (estimator.ho_range[1] if estimator.ho_range is not None else 0)

    def peak(h: int) -> Estimate:
        return estimate(costs, graphs_at(estimator, h, num_steps), num_steps, ema)

    fitting = [h for h in range(1, last + 1) if peak(h).total <= budget_gb * GB]
    if not fitting:
        raise UserError(f"estimator.h=auto: not even h=1 fits trainer.memory_budget_gb={budget_gb:g}: it needs "
                        f"{peak(1).line()}; raise the budget or lower trainer.batch_size / estimator.fo_steps")
    h = estimator.h = fitting[-1]
    why = f"h={h + 1} would need {peak(h + 1).total / GB:.3g} GB" if h < last else \
        f"h={h} is the longest sub-chain fo_steps={k} leaves"
    return (f"estimator.h=auto: h={h}, the largest that fits trainer.memory_budget_gb={budget_gb:g}: estimated peak "
            f"{peak(h).line()}; {why}")


def graphs_at(estimator, h: int, num_steps: int) -> list[Graph]:
    """The estimator's graphs at sub-chain length h (its own h is left as it was)."""
    kept, estimator.h = estimator.h, h
    try:
        return estimator.graphs(num_steps)
    finally:
        estimator.h = kept


def plan(policy, reward: Reward, prompts: list[str], estimator, ema: bool, budget_gb: float | None, full: bool) -> str:
    """What the run prints: h=auto's one line (and sets estimator.h), and with `full` the whole plan."""
    if not isinstance(estimator, Planned):
        raise UserError(f"trainer.plan / estimator.h=auto: no memory model for {type(estimator).__name__} (rlr, "
                        "full_bp, truncated_bp, draft_lv and refl have one)")
    costs = probe(policy, reward, prompts, keep_x0=getattr(estimator, "baseline", None) == "state")
    t, lines = policy.num_steps, []
    if getattr(estimator, "h", None) == "auto":
        assert budget_gb is not None, "the validation pass requires trainer.memory_budget_gb with h=auto"
        lines.append(auto_h(estimator, costs, t, budget_gb, ema))
    if full:
        graphs = estimator.graphs(t)
        lines.append(describe(costs, graphs, t, len(prompts), ema))
        if budget_gb is not None:
            peak = estimate(costs, graphs, t, ema).total / GB
            verdict = "fits" if peak <= budget_gb else "does NOT fit"
            lines.append(f"  trainer.memory_budget_gb={budget_gb:g}: {verdict} ({peak:.3g} GB)")
    return "\n".join(lines)
