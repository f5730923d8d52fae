"""scripts/compare_estimators.py end to end on the toy world, at a budget of a few samples: real runs, a real
table, real plots, and a rerun that reads finished runs instead of training them again."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT

SMALL = ["model.num_steps=4", "trainer.batch_size=2", "trainer.eval_prompts=4", "trainer.eval_batch_size=4"]


def compare(out, samples: int = 4, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/compare_estimators.py", "--samples", str(samples), "--seeds", "0",
               "--estimators", "truncated_bp", "shortft", "--jobs", "2", "--threads", "1", "--out", str(out), *SMALL]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def test_compare_writes_a_row_per_estimator_and_a_rerun_reuses_finished_runs(tmp_path):
    out = tmp_path / "compare"
    compare(out)
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| truncated_bp", "| shortft"]
    results = json.loads((out / "results.json").read_text())
    for name in ("truncated_bp", "shortft"):
        (run,) = results[name]
        assert [point[0] for point in run["curve"]] == [2.0, 4.0]  # 4 samples in steps of 2, then stopped
        assert run["last_eval"]["step"] == 2 and len(run["last_eval"]["rewards"]) == 4
    assert (out / "reward_vs_samples.png").stat().st_size > 0 and (out / "reward_vs_seconds.png").stat().st_size > 0

    metrics = out / "runs" / "shortft_seed0" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    compare(out)
    assert metrics.stat().st_mtime_ns == before  # read, not retrained
    assert json.loads((out / "results.json").read_text()) == results

    other = compare(out, samples=6, check=False)  # a finished run of another budget is never mixed in
    assert other.returncode != 0 and "holds a run with other settings" in other.stderr
    assert metrics.stat().st_mtime_ns == before
