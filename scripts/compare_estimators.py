"""Train every estimator on the toy world with the same sample budget over several seeds; tabulate and plot.

    python scripts/compare_estimators.py --samples 256 --seeds 0 1 2 --out results/compare_toy
    python scripts/compare_estimators.py --model toy_flow --out results/compare_toy_flow   # the toy flow model

Each (estimator, seed) is a real `rlr-train experiment=toy_aesthetic_<estimator>` run in its own process
(so peak memory is its own), stopped by trainer.max_samples. Writes table.md, results.json and
reward_vs_samples.png / reward_vs_seconds.png into --out. `--jobs 2 --threads 1` runs two at a time with
one torch thread each (every run then sees the same contention, so seconds stay comparable). A finished
run (its folder holds compare_run.json with the same overrides) is read, not rerun: after a crash the
same command carries on, and an unfinished run's folder is started again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlr_cli.run_folder import RunFolder  # noqa: E402

ESTIMATORS = ["rlr", "rlr_official", "ddpo", "truncated_bp", "draft_lv", "refl", "full_bp", "shortft"]
SETUPS = {"toy": [], "toy_flow": ["setup=toy_flow_aesthetic"]}  # the toy_aesthetic_* presets on either toy model


def available(estimators: list[str]) -> list[str]:
    return [e for e in estimators if (ROOT / "configs" / "experiment" / f"toy_aesthetic_{e}.yaml").exists()]


def train(estimator: str, seed: int, samples: int, eval_every: int, run_dir: Path, extra: list[str],
          threads: int) -> float:
    """One run (or the record of a finished one); returns its wall-clock seconds, start-up included."""
    overrides = [f"experiment=toy_aesthetic_{estimator}", f"seed={seed}", f"trainer.max_samples={samples}",
                 "trainer.max_steps=100000", f"trainer.eval_every={eval_every}", "trainer.checkpoint_every=0",
                 "trainer.progress=false", "logger=none", f"hydra.run.dir={run_dir}", *extra]
    record = run_dir / "compare_run.json"  # written last: its presence marks the run complete
    if record.exists():
        done = json.loads(record.read_text())
        if done["overrides"] != overrides:
            raise SystemExit(f"{run_dir} holds a run with other settings ({' '.join(done['overrides'])}); "
                             "choose another --out or remove that folder")
        return done["wall_seconds"]
    if run_dir.exists():  # an unfinished run (a crash): start it again from nothing
        shutil.rmtree(run_dir)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rlr_cli.cli", *overrides], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{estimator} seed {seed} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"overrides": overrides, "wall_seconds": seconds}) + "\n")
    return seconds


def read_run(run_dir: Path) -> dict:
    folder = RunFolder(run_dir)
    steps, (first, last) = folder.train_steps, (folder.evals[0], folder.evals[-1])
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
    def held_out(group: list[dict], key: str | None, scale: float = 1.0) -> str:
        """start -> end (mean +- std over seeds) of a held-out figure: the reward (key None) or a metric."""
        def value(evaluation: dict) -> float:
            return scale * (evaluation["reward_mean"] if key is None else evaluation["metrics"][key]["mean"])

        start = statistics.mean(value(run["first_eval"]) for run in group)
        return f"{start:.4g} -> {fmt([value(run['last_eval']) for run in group])}"

    rows = [f"Budget: {samples} training trajectories per run; mean +- std over seeds. Threshold: training "
            f"reward (3-step mean) >= {threshold:.3f}. Held-out: the run's own evaluation (start -> end).", "",
            "| estimator | seeds | final train reward | held-out toy_aesthetic | held-out toy_clipscore | "
            "judge: all three right (%) | samples to threshold | training seconds to threshold | "
            "wall seconds per run | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, group in runs.items():
        reached = [r for r in (reach(run["curve"], threshold) for run in group) if r]
        rows.append(
            f"| {name} | {len(group)} | {fmt([run['curve'][-1][2] for run in group])} | {held_out(group, None)} | "
            f"{held_out(group, 'clipscore')} | {held_out(group, 'judge_all_three', 100)} | "
            f"{fmt([r[0] for r in reached]) if reached else 'not reached'} ({len(reached)}/{len(group)}) | "
            f"{fmt([r[1] for r in reached]) if reached else '-'} | {fmt([run['wall_seconds'] for run in group])} | "
            f"{fmt([run['peak_mem_mb'] for run in group], 4)} |"
        )
    return "\n".join(rows) + "\n"


def smooth(values: list[float], window: int = 4) -> list[float]:
    """Trailing moving average (a batch mean of 8 rewards is noisy)."""
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [("training trajectories", "reward_vs_samples.png"),
            ("wall-clock training seconds (evaluations excluded)", "reward_vs_seconds.png")]
    for axis_index, (label, filename) in enumerate(axes):
        figure, axis = plt.subplots(figsize=(7, 4))
        for colour, (name, group) in enumerate(runs.items()):
            curves = [([point[axis_index] for point in run["curve"]], smooth([point[2] for point in run["curve"]]))
                      for run in group]
            for xs, ys in curves:  # each seed, thin
                axis.plot(xs, ys, color=f"C{colour}", alpha=0.25, linewidth=0.8)
            grid = curves[0][0]  # the seeds' mean on the first seed's x values, thick
            mean = np.mean([np.interp(grid, xs, ys) for xs, ys in curves], axis=0)
            axis.plot(grid, mean, color=f"C{colour}", linewidth=2, label=f"{name} (mean of {len(group)})")
        axis.set_xlabel(label)
        axis.set_ylabel("training reward, 4-step moving mean")
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
    parser.add_argument("--threshold", type=float, default=None,
                        help="training reward to reach (default: halfway from the start to the best held-out end)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compare_toy")
    parser.add_argument("--model", choices=sorted(SETUPS), default="toy",
                        help="toy (DDIM) | toy_flow (the flow SDE): the toy world's setup the presets run in")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="train nothing: tabulate and plot the results.json of these --out folders together")
    parser.add_argument("overrides", nargs="*", help="extra rlr-train overrides for every run")
    args = parser.parse_args()
    if args.merge:  # each group named after its folder: runs with other overrides side by side
        runs = {f"{name} ({folder.name})": group for folder in args.merge
                for name, group in json.loads((folder / "results.json").read_text()).items()}
        args.out.mkdir(parents=True, exist_ok=True)
        return report(runs, args.out, args.threshold, args.samples)
    estimators = available(args.estimators)
    if args.model == "toy_flow" and "shortft" in estimators:  # its shortcuts shorten a DDIM chain
        print("shortft: not run on toy_flow (estimator=shortft needs a DDIM model)", flush=True)
        estimators.remove("shortft")
    jobs = [(name, seed) for name in estimators for seed in args.seeds]

    def one(job: tuple[str, int]) -> dict:
        name, seed = job
        run_dir = args.out / "runs" / f"{name}_seed{seed}"
        seconds = train(name, seed, args.samples, args.eval_every, run_dir, SETUPS[args.model] + args.overrides,
                        args.threads)
        print(f"{name} seed {seed}: {seconds:.0f} s", flush=True)
        return read_run(run_dir) | {"wall_seconds": seconds}

    runs: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, _), run in zip(jobs, pool.map(one, jobs)):
            runs.setdefault(name, []).append(run)
    report(runs, args.out, args.threshold, args.samples)


def report(runs: dict[str, list[dict]], out: Path, threshold: float | None, samples: int) -> None:
    """table.md, results.json and the two plots in out."""
    base = statistics.mean(run["first_eval"]["reward_mean"] for group in runs.values() for run in group)
    best = max(statistics.mean(run["last_eval"]["reward_mean"] for run in group) for group in runs.values())
    threshold = base + 0.5 * (best - base) if threshold is None else threshold
    markdown = table(runs, threshold, samples)
    (out / "table.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    plot(runs, out)
    print(markdown)


if __name__ == "__main__":
    main()
