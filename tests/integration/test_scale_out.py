"""Scale-out: a real 2-rank accelerate group on CPU (gloo) and a real 2-job Hydra multirun."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import ROOT, rlr_train

SMALL = ["trainer.batch_size=2", "logger=none", "model.num_steps=5", "trainer.eval_every=0"]


def test_two_rank_group_trains_in_sync_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    rlr_train(*SMALL, "trainer.num_processes=2", "trainer.max_steps=2", "trainer.checkpoint_every=2",
              run_dir=run_dir, timeout=300)
    checkpoint = run_dir / "checkpoints" / "step_2"
    assert (checkpoint / "rng_rank0.safetensors").exists() and (checkpoint / "rng_rank1.safetensors").exists()
    assert json.loads((run_dir / "ranks.json").read_text()) == {"num_processes": 2, "max_weight_difference": 0.0}

    rlr_train(*SMALL, "trainer.num_processes=2", "trainer.max_steps=4", "trainer.checkpoint_every=2",
              "trainer.resume_from=latest", run_dir=run_dir, timeout=300)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one logger (rank 0), continued from the checkpoint
    assert (run_dir / "checkpoints" / "step_4" / "rng_rank1.safetensors").exists()
    assert json.loads((run_dir / "ranks.json").read_text())["max_weight_difference"] == 0.0


def test_two_job_multirun_writes_two_complete_run_folders(tmp_path):
    command = [sys.executable, "-m", "rlr_cli.cli", "-m", *SMALL, "trainer.max_steps=1", "seed=0,1",
               f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "config.yaml").exists() and (run / "adapter" / "pytorch_lora_weights.safetensors").exists()
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    report = subprocess.run([sys.executable, "scripts/reproduce.py", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = [line for line in (tmp_path / "report" / "table.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 1 and "| 2 |" in rows[0]  # the two seeds of one setup form one row
    assert (tmp_path / "report" / "curves.png").stat().st_size > 1000


def test_slurm_launcher_config_composes(tmp_path):
    result = rlr_train("--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", run_dir=tmp_path)
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout
