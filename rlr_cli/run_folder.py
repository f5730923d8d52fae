"""The one reader (and the atomic JSON writer) of a run folder; see the README's "The run folder".

    config.yaml  metrics.jsonl  eval/step_N.json  samples/step_N.png  checkpoints/step_N/  adapter/
    .hydra/overrides.yaml (Hydra's record of the command line)
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from rlr_cli.errors import UserError

SETUP_FILES = {"config.yaml", ".hydra", ".lock"}  # written before a job's first step, with Hydra's <job>.log
_held: dict[Path, int] = {}  # run folders this process has claimed -> the open lock file


def write_json(path: Path, payload: dict) -> None:
    """Whole or absent: written to a temporary file, then renamed over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(payload, indent=1))
    os.replace(scratch, path)


def _step_of(path: Path) -> int:
    return int(path.stem.split("_")[1]) if path.is_file() else int(path.name.split("_")[1])


@dataclass(frozen=True)
class RunFolder:
    path: Path

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def exists(self) -> bool:
        return self.metrics_file.exists()

    @cached_property
    def metrics(self) -> list[dict]:
        """Every line of metrics.jsonl (training steps and evaluations), in order."""
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    @property
    def train_steps(self) -> list[dict]:
        """The lines of training steps (evaluation lines carry no loss)."""
        return [line for line in self.metrics if "loss" in line]

    @cached_property
    def evals(self) -> list[dict]:
        """eval/step_N.json of every held-out evaluation, by step."""
        files = sorted((self.path / "eval").glob("step_*.json"), key=_step_of)
        return [json.loads(f.read_text()) for f in files]

    def grids(self) -> list[Path]:
        return sorted((self.path / "samples").glob("step_*.png"), key=_step_of)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        folders = [p for p in (self.path / "checkpoints").glob("step_*") if (p / "state.json").exists()]
        return sorted(folders, key=_step_of)

    def overrides(self) -> list[str]:
        """The command line's overrides as Hydra recorded them (empty when there is no record)."""
        from omegaconf import OmegaConf

        record = self.path / ".hydra" / "overrides.yaml"
        return [str(o) for o in OmegaConf.load(record)] if record.exists() else []  # type: ignore[union-attr]

    def claim(self) -> None:
        """Lock the folder for this process (released when it exits); a folder another run holds is refused."""
        import fcntl

        path = self.path.resolve()
        if path in _held:
            return
        path.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise UserError(f"run folder {self.path} is in use by another run (pid {holder}); "
                            f"wait for it or choose another hydra.run.dir") from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        _held[path] = descriptor

    def discard_if_unused(self) -> None:
        """Remove the folder this process claimed when it holds only what a job writes before its work
        (config, Hydra's record)."""
        path = self.path.resolve()
        if path in _held and all(p.name in SETUP_FILES or p.suffix == ".log" for p in path.iterdir()):
            shutil.rmtree(path)
            os.close(_held.pop(path))
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # outputs/<run_name>/, when this was its only run

    def truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after the checkpoint it is resumed from."""
        kept = [line for line in self.metrics if line.get("step", 0) <= step]
        self.metrics_file.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self.__dict__.pop("metrics", None)


def find_latest(run_dir: Path) -> Path | None:
    """Newest checkpoint of this run folder, else of its sibling runs (same parent folder)."""
    own = RunFolder(run_dir).checkpoints()
    if own:
        return own[-1]
    siblings = [c for sibling in run_dir.parent.glob("*") if sibling.is_dir() for c in RunFolder(sibling).checkpoints()[-1:]]
    return max(siblings, key=lambda p: p.stat().st_mtime) if siblings else None
