"""Run logging: JSONL always; tensorboard and wandb when configured. Only rank 0 ever holds a logger."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

from torch import Tensor


class JsonlLogger:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None:
        pass  # image grids are files in samples/, written by the trainer

    def close(self) -> None:
        self.file.close()


class TensorboardLogger:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None:
        self.writer.add_images("samples", images.float().cpu(), step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, project: str, mode: Any, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir), config=config, name=run_dir.name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None:
        pictures = [self.wandb.Image(image.float().cpu(), caption=caption) for image, caption in zip(images, captions)]
        self.run.log({"samples": pictures}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fans out to every configured backend."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, metrics: dict[str, float], step: int) -> None:
        for backend in self.backends:
            backend.log(metrics, step)

    def log_images(self, images: Tensor, captions: Sequence[str], step: int) -> None:
        for backend in self.backends:
            backend.log_images(images, captions, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


class LoggerSpec:
    """Which backends to open once the run folder is known (the `logger` config group)."""

    def __init__(self, *, tensorboard: bool, wandb: bool, wandb_project: str,
                 wandb_mode: Literal["offline", "online", "disabled"]):
        self.tensorboard, self.wandb = tensorboard, wandb
        self.wandb_project, self.wandb_mode = wandb_project, wandb_mode

    def open(self, run_dir: Path, config: dict) -> Loggers:
        backends: list = [JsonlLogger(run_dir / "metrics.jsonl")]
        if self.tensorboard:
            backends.append(TensorboardLogger(run_dir / "tensorboard"))
        if self.wandb:
            mode = os.environ.get("WANDB_MODE", self.wandb_mode)
            backends.append(WandbLogger(run_dir, self.wandb_project, mode, config))
        return Loggers(backends)
