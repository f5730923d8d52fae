"""The package as a user installs it: a wheel in a fresh virtual environment, run with no source tree beside it.

The wheel is installed without dependencies; the fresh environment reaches the ones already installed
through a .pth line (a path entry only: the checkout's editable install is not seen), so the test needs no
network and no second copy of torch.
"""
from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from helpers import ROOT


def run(command: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result


def test_wheel_installs_and_runs_the_toy_job_from_a_fresh_venv(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # a copy: building writes build/ into its tree
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "results", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        cwd=tmp_path)
    (wheel,) = dist.glob("rlr_train-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # ensurepip: pip from the interpreter's own files
    python = env_dir / "bin" / "python"
    fresh_site = Path(run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path).stdout.strip())
    (fresh_site / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)

    work = tmp_path / "elsewhere"  # no checkout here or above
    work.mkdir()
    located = run([str(python), "-c", "import rlr_cli, rewards; print(rlr_cli.__file__, rewards.__file__)"], work).stdout
    assert str(ROOT) not in located and str(fresh_site) in located

    job = run([str(env_dir / "bin" / "rlr-train"), "--cfg", "job"], work).stdout
    assert "_target_: rlr_cli.models.sd.policy" in job

    run_dir = work / "run"  # the toy world's weights come from the installed package
    run([str(env_dir / "bin" / "rlr-train"), "trainer.max_steps=2", "trainer.batch_size=2", "trainer.eval_every=2",
         "trainer.eval_prompts=2", "trainer.checkpoint_every=0", "logger=none", f"hydra.run.dir={run_dir}"], work)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2] and (run_dir / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (run_dir / "eval" / "step_2.json").exists() and (run_dir / "summary.txt").exists()

