"""The end-of-run report: before/after grid, reward curve and a printed summary of held-out metrics."""
from __future__ import annotations

from pathlib import Path

from rlr_cli.run_folder import RunFolder


def plot_reward_curve(run_dir: Path, evals: list[dict]) -> Path:
    """Training reward per step and held-out reward (+- standard error) at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(line["step"], line["reward_mean"]) for line in RunFolder(run_dir).train_steps]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if train:
        axis.plot(*zip(*train), alpha=0.6, label="training batch")
    axis.errorbar([e["step"] for e in evals], [e["reward_mean"] for e in evals],
                  yerr=[e["reward_se"] for e in evals], marker="o", capsize=3, label="held-out (fixed seeds)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("reward")
    axis.legend()
    figure.tight_layout()
    path = run_dir / "reward_curve.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def before_after_grid(run_dir: Path, first: int, last: int) -> Path:
    """samples/step_<first>.png above samples/step_<last>.png in one image."""
    from PIL import Image

    top, bottom = (Image.open(run_dir / "samples" / f"step_{s}.png").convert("RGB") for s in (first, last))
    canvas = Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height))
    path = run_dir / "samples" / "before_after.png"
    canvas.save(path)
    return path


def paired_improvement(before: list[float], after: list[float]) -> str:
    """Mean change over the same prompts and seeds, with the standard error of that mean."""
    import statistics

    differences = [b - a for a, b in zip(before, after)]
    mean = statistics.mean(differences)
    se = statistics.stdev(differences) / len(differences) ** 0.5
    ratio = mean / se if se > 0 else float("inf")
    return f"reward change {mean:+.4f} +- {se:.4f} (paired over the same prompts and seeds: {ratio:.1f} se)"


def write_report(run_dir: Path) -> str:
    """Write the plots; return the summary: each held-out metric at the first and last evaluation."""
    evals = RunFolder(run_dir).evals
    if len(evals) < 2:
        return "rlr-train: fewer than two evaluations, no before/after summary"
    first, last = evals[0], evals[-1]
    plot_reward_curve(run_dir, evals)
    before_after_grid(run_dir, first["step"], last["step"])
    n = len(first["rewards"])
    rows = [f"held-out summary ({n} prompts, fixed seeds): step {first['step']} -> step {last['step']}",
            f"  reward      {first['reward_mean']:.4f} +- {first['reward_se']:.4f}  ->  "
            f"{last['reward_mean']:.4f} +- {last['reward_se']:.4f}  (mean +- se)"]
    if first["prompts"] == last["prompts"] and n > 1:
        rows.append("  " + paired_improvement(first["rewards"], last["rewards"]))
    for key, stats in last.get("metrics", {}).items():
        before = first.get("metrics", {}).get(key)
        if before:
            rows.append(f"  {key:<11} {before['mean']:.4f} +- {before['se']:.4f}  ->  {stats['mean']:.4f} +- {stats['se']:.4f}")
    steps = RunFolder(run_dir).train_steps
    if steps and "clipped_fraction" in steps[-1]:
        rows.append(f"  gradient clipped on {steps[-1]['clipped_fraction']:.0%} of {steps[-1]['step']} steps "
                    "(trainer.max_grad_norm; a clipped update is biased)")
    rows.append(f"  plots: {run_dir / 'reward_curve.png'}, {run_dir / 'samples' / 'before_after.png'}")
    summary = "\n".join(rows)
    (run_dir / "summary.txt").write_text(summary + "\n")
    return summary
