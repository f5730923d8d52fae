"""Tables, reward curves and a report from a Hydra multirun folder.

    rlr-train -m experiment=toy_aesthetic_rlr,toy_aesthetic_ddpo seed=0,1 hydra.sweep.dir=multirun/repro
    python scripts/reproduce.py multirun/repro            # -> multirun/repro/report/{table.md,curves.png,report.md}

Jobs are grouped by everything they override except the seed; each row is mean +- std over seeds of
the final held-out reward (last eval/step_N.json) and the last training reward (metrics.jsonl).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlr_cli.run_folder import RunFolder  # noqa: E402


def job_key(job: Path) -> str:
    """The job's overrides without its seed (and without bookkeeping keys)."""
    kept = [o for o in RunFolder(job).overrides() if not o.startswith(("seed=", "hydra", "trainer.progress"))]
    return " ".join(kept) or job.name


def read_job(job: Path) -> dict | None:
    folder = RunFolder(job)
    if not folder.exists():
        return None
    train = [(line["step"], line["reward_mean"]) for line in folder.train_steps]
    evals = folder.evals
    return {"train": train, "final_eval": evals[-1] if evals else None, "first_eval": evals[0] if evals else None,
            "grids": folder.grids()}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} +- {spread:.2g}"


def table(groups: dict[str, list[dict]]) -> str:
    rows = ["| job (overrides) | seeds | held-out reward, start | held-out reward, end | train reward, last step |",
            "|---|---|---|---|---|"]
    for key, jobs in sorted(groups.items()):
        start = [j["first_eval"]["reward_mean"] for j in jobs if j["first_eval"]]
        end = [j["final_eval"]["reward_mean"] for j in jobs if j["final_eval"]]
        last = [j["train"][-1][1] for j in jobs if j["train"]]
        rows.append(f"| `{key}` | {len(jobs)} | {mean_std(start)} | {mean_std(end)} | {mean_std(last)} |")
    return "\n".join(rows) + "\n"


def plot_curves(groups: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for key, jobs in sorted(groups.items()):
        for index, job in enumerate(jobs):
            if job["train"]:
                steps, rewards = zip(*job["train"])
                axis.plot(steps, rewards, color=f"C{sorted(groups).index(key) % 10}", alpha=0.8,
                          label=key if index == 0 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training reward (batch mean)")
    axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: SWEEP_DIR/report)")
    args = parser.parse_args()
    groups: dict[str, list[dict]] = defaultdict(list)
    for job in sorted(p for p in args.sweep_dir.iterdir() if p.is_dir()):
        record = read_job(job)
        if record is not None:
            groups[job_key(job)].append(record)
    if not groups:
        raise SystemExit(f"reproduce.py: no finished runs (metrics.jsonl) under {args.sweep_dir}")
    out = args.out or args.sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    markdown = table(groups)
    (out / "table.md").write_text(markdown)
    plot_curves(groups, out / "curves.png")
    report = ["# Reproduction report", "", markdown, "![reward curves](curves.png)", ""]
    for key, jobs in sorted(groups.items()):
        if jobs[0]["grids"]:
            report += [f"## `{key}` (first seed)", "", f"![before]({jobs[0]['grids'][0].resolve()})",
                       f"![after]({jobs[0]['grids'][-1].resolve()})", ""]
    (out / "report.md").write_text("\n".join(report))
    print(markdown)
    print(f"wrote {out / 'table.md'}, {out / 'curves.png'}, {out / 'report.md'}")


if __name__ == "__main__":
    main()
