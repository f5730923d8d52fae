"""What tests share: the repository's paths, the real CLI in a subprocess, configs composed as rlr-train does."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def rlr_train(*args: str, run_dir: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real console entry point in a fresh process, writing its run folder to run_dir.

    timeout is a hang guard, not a speed requirement.
    """
    command = [sys.executable, "-m", "rlr_cli.cli", *args, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"rlr-train {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def compose_config(*overrides: str):
    """The job config exactly as rlr-train composes it."""
    from rlr_cli.config import compose

    return compose(list(overrides))


def build_run(*overrides: str):
    """The run rlr-train would build: composed, validated, instantiated."""
    from rlr_cli.build import build
    from rlr_cli.config import validate

    return build(validate(compose_config(*overrides)))


def user_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints (asserting there is exactly one and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]
