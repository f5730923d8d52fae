"""Train every estimator on the toy world with the same sample budget over several seeds; tabulate and plot.

    python scripts/compare_estimators.py --samples 256 --seeds 0 1 2 --out results/compare_toy

Each (estimator, seed) is a real `rlr-train experiment=toy_aesthetic_<estimator>` run in its own process
(so peak memory is its own), stopped by trainer.max_samples. Writes table.md, results.json and
reward_vs_samples.png / reward_vs_seconds.png into --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESTIMATORS = ["rlr", "rlr_official", "ddpo", "truncated_bp", "draft_lv", "refl", "full_bp", "shortft"]


def available(estimators: list[str]) -> list[str]:
    return [e for e in estimators if (ROOT / "configs" / "experiment" / f"toy_aesthetic_{e}.yaml").exists()]


def train(estimator: str, seed: int, samples: int, eval_every: int, run_dir: Path, extra: list[str]) -> float:
    """One run; returns its wall-clock seconds (the process's whole life, start-up included)."""
    command = [sys.executable, "-m", "rlr_cli.cli", f"experiment=toy_aesthetic_{estimator}", f"seed={seed}",
               f"trainer.max_samples={samples}", "trainer.max_steps=100000", f"trainer.eval_every={eval_every}",
               "trainer.checkpoint_every=0", "trainer.progress=false", "logger=none", f"hydra.run.dir={run_dir}",
               *extra]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{estimator} seed {seed} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def read_run(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [line for line in lines if "loss" in line]
    evals = sorted((run_dir / "eval").glob("step_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    first, last = (json.loads(evals[i].read_text()) for i in (0, -1))
    elapsed, curve = 0.0, []
    for line in steps:
        elapsed += line["step_seconds"]
        curve.append((line["samples_total"], elapsed, line["reward_mean"]))
    return {"curve": curve, "first_eval": first, "last_eval": last,
            "peak_mem_mb": max(line["peak_mem_mb"] for line in steps)}


def reach(curve: list[tuple[float, float, float]], threshold: float, window: int = 3):
    """(samples, seconds) when the training reward, averaged over `window` steps, first reaches threshold."""
    for i in range(len(curve)):
        recent = [c[2] for c in curve[max(0, i - window + 1) : i + 1]]
        if statistics.mean(recent) >= threshold:
            return curve[i][0], curve[i][1]
    return None


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "not reached"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}g} +- {spread:.2g}"


def table(runs: dict[str, list[dict]], threshold: float, samples: int) -> str:
    metric = lambda run, key: run["last_eval"]["metrics"].get(key, {}).get("mean", float("nan"))  # noqa: E731
    rows = [f"Budget: {samples} training trajectories per run; mean +- std over seeds. Threshold: training "
            f"reward (3-step mean) >= {threshold:.3f}.", "",
            "| estimator | seeds | final train reward | held-out toy_aesthetic (start -> end) | held-out toy_clipscore | "
            "judge: all three right | samples to threshold | seconds to threshold | peak memory (MB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, group in runs.items():
        reached = [r for r in (reach(run["curve"], threshold) for run in group) if r]
        start = statistics.mean(run["first_eval"]["reward_mean"] for run in group)
        rows.append(
            f"| {name} | {len(group)} | {fmt([run['curve'][-1][2] for run in group])} | "
            f"{start:.3f} -> {fmt([run['last_eval']['reward_mean'] for run in group])} | "
            f"{fmt([metric(run, 'clipscore') for run in group])} | {fmt([metric(run, 'judge_all_three') for run in group])} | "
            f"{fmt([r[0] for r in reached]) if reached else 'not reached'} ({len(reached)}/{len(group)}) | "
            f"{fmt([r[1] for r in reached]) if reached else '-'} | {fmt([run['peak_mem_mb'] for run in group], 4)} |"
        )
    return "\n".join(rows) + "\n"


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for axis_index, (label, filename) in enumerate([("training trajectories", "reward_vs_samples.png"),
                                                     ("training seconds", "reward_vs_seconds.png")]):
        figure, axis = plt.subplots(figsize=(7, 4))
        for colour, (name, group) in enumerate(runs.items()):
            for seed_index, run in enumerate(group):
                xs = [point[axis_index] for point in run["curve"]]
                axis.plot(xs, [point[2] for point in run["curve"]], color=f"C{colour}", alpha=0.7,
                          label=name if seed_index == 0 else None)
        axis.set_xlabel(label)
        axis.set_ylabel("training reward (toy_aesthetic, batch mean)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / filename, dpi=120)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256, help="training trajectories per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compare_toy")
    parser.add_argument("overrides", nargs="*", help="extra rlr-train overrides for every run")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    for name in available(args.estimators):
        for seed in args.seeds:
            run_dir = args.out / "runs" / f"{name}_seed{seed}"
            seconds = train(name, seed, args.samples, args.eval_every, run_dir, args.overrides)
            runs.setdefault(name, []).append(read_run(run_dir) | {"wall_seconds": seconds})
            print(f"{name} seed {seed}: {seconds:.0f} s", flush=True)
    base = statistics.mean(run["first_eval"]["reward_mean"] for group in runs.values() for run in group)
    best = max(statistics.mean(run["last_eval"]["reward_mean"] for run in group) for group in runs.values())
    threshold = base + 0.5 * (best - base)
    markdown = table(runs, threshold, args.samples)
    (args.out / "table.md").write_text(markdown)
    (args.out / "results.json").write_text(json.dumps(runs, indent=1))
    plot(runs, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
