"""The memory planner's estimate (trainer.plan, estimator.h=auto) against the measured peak of real training steps.

    python scripts/bench_memory_plan.py                    # toy, tiny, tiny_sd3, tiny_flux on the CPU
    python scripts/bench_memory_plan.py --device cuda      # + SD-1.5- and SD3.5-M-shaped models, random weights
    python scripts/bench_memory_plan.py --out results/bench_memory_plan_cpu.md

Each row runs in a fresh process: the run is built as rlr-train builds it, the planner probes and estimates,
then the real Trainer takes --steps optimizer steps and the peak is measured:
  CUDA  torch.cuda.max_memory_allocated over the steps, against the whole estimate;
  CPU   the peak resident set size during the steps (VmHWM, reset through /proc/self/clear_refs after
        malloc_trim returns freed heap) less the resident size before them, against the estimate less the
        weights (resident before the steps). Linux only.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_ROWS = {  # name -> rlr-train overrides
    "toy rlr h=1": ["model=toy", "reward=toy_aesthetic", "prompts=toy", "estimator=rlr", "estimator.h=1"],
    "toy rlr h=4": ["model=toy", "reward=toy_aesthetic", "prompts=toy", "estimator=rlr", "estimator.h=4"],
    "toy rlr h=4 + state": ["model=toy", "reward=toy_aesthetic", "prompts=toy", "estimator=rlr", "estimator.h=4",
                            "estimator.baseline=state"],
    "toy full_bp": ["model=toy", "reward=toy_aesthetic", "prompts=toy", "estimator=full_bp"],
    "tiny rlr h=1": ["model=tiny", "model.resolution=64", "reward=saturation", "estimator=rlr", "estimator.h=1"],
    "tiny rlr h=4": ["model=tiny", "model.resolution=64", "reward=saturation", "estimator=rlr", "estimator.h=4"],
    "tiny truncated_bp k=3": ["model=tiny", "model.resolution=64", "reward=saturation", "estimator=truncated_bp",
                              "estimator.k=3"],
    "tiny_sd3 rlr h=2": ["model=tiny_sd3", "reward=saturation", "estimator=rlr", "estimator.h=2"],
    "tiny_flux rlr h=2": ["model=tiny_flux", "reward=saturation", "estimator=rlr", "estimator.h=2"],
}
CUDA_ROWS = {  # SD15 is the SD-1.5-shaped random pipeline scripts/bench_estimators.py writes
    "sd15-shaped 512px rlr h=1": ["model=sd15", "model.path=SD15", "reward=saturation", "estimator=rlr", "estimator.h=1"],
    "sd15-shaped 512px rlr h=4": ["model=sd15", "model.path=SD15", "reward=saturation", "estimator=rlr", "estimator.h=4"],
}


def resident_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(overrides: list[str], steps: int, device: str) -> dict:
    """One row: build, plan, train `steps` steps, measure."""
    import torch

    from rlr_cli.build import build
    from rlr_cli.config import compose, validate
    from rlr_cli.interfaces import Planned
    from rlr_cli.plan import GB, estimate, probe
    from rlr_cli.trainer import Trainer

    torch.set_num_threads(1)
    common = ["logger=none", "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress=false",
              f"trainer.max_steps={steps}", f"trainer.cpu={str(device == 'cpu').lower()}"]
    run = build(validate(compose([*overrides, *common])))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(run, Path(folder) / "run")
        estimator, policy = run.estimator, trainer.policy
        assert isinstance(estimator, Planned), f"{type(estimator).__name__} has no memory model"
        prompts = run.prompts.sample(run.trainer.batch_size, torch.Generator().manual_seed(0))
        costs = probe(policy, run.reward, prompts, keep_x0=getattr(estimator, "baseline", None) == "state")
        planned = estimate(costs, estimator.graphs(policy.num_steps), policy.num_steps, ema=False)
        if device == "cpu":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            before = resident_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            trainer.train_step()
            trainer.state.step += 1
        if device == "cpu":
            measured = (resident_mb("VmHWM") - before) * 2**20
            estimated = planned.total - planned.parts["weights"]
        else:
            measured, estimated = torch.cuda.max_memory_allocated(), planned.total
    return {"estimated_gb": estimated / GB, "measured_gb": measured / GB, "batch": run.trainer.batch_size,
            "num_steps": policy.num_steps, "parts": {k: v / GB for k, v in planned.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all for the device)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.steps, args.device)))
        return
    rows = dict(CPU_ROWS)
    if args.device.startswith("cuda"):
        from bench_estimators import sd15_pipeline_folder

        folder = sd15_pipeline_folder(os.environ.get("RLR_CACHE_DIR", os.path.expanduser("~/.cache/rlr-train")))
        rows |= {name: [o.replace("=SD15", f"={folder}") for o in overrides] for name, overrides in CUDA_ROWS.items()}
    chosen = args.rows.split(",") if args.rows else list(rows)
    what = "whole step (max_memory_allocated)" if args.device != "cpu" else "above the resident size before the steps (VmHWM)"
    lines = [f"Memory planner against {args.steps} real training steps on {args.device}, batch {args.batch_size}; "
             f"measured: {what}.", "",
             "| run | T | estimated GB | measured GB | estimate / measured |", "|---|---|---|---|---|"]
    for name in chosen:
        overrides = [*rows[name], f"trainer.batch_size={args.batch_size}"]
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(overrides), "--steps", str(args.steps),
                               "--device", args.device], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            lines.append(f"| {name} | failed: {reason} | | | |")
            print(lines[-1], flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        lines.append(f"| {name} | {r['num_steps']} | {r['estimated_gb']:.3f} | {r['measured_gb']:.3f} | "
                     f"{r['estimated_gb'] / r['measured_gb']:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
