"""Shared fixtures: offline, wandb off, one tiny-model cache per test session (inherited by subprocesses)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RLR_CACHE_DIR", tempfile.mkdtemp(prefix="rlr-test-cache-"))


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from rlr_cli.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(os.environ["RLR_CACHE_DIR"])


def rlr_train(*args: str, run_dir: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, writing its run folder to run_dir."""
    command = [sys.executable, "-m", "rlr_cli.cli", *args, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"rlr-train {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def compose_config(*overrides: str):
    """The job config exactly as rlr-train composes it."""
    from rlr_cli.cli import compose

    return compose(list(overrides))
