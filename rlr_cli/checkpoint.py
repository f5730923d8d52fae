"""Checkpoints: written atomically (temporary folder + rename), restored exactly (weights, optimizer,
LR schedule, RNG states, fp16 loss scale, trainer and estimator state).

Layout of checkpoints/step_N/: adapter/ (diffusers LoRA format), optimizer.pt (tensors only, loaded with
weights_only=True), state.json (step, counters, LR schedule, estimator state, Python/NumPy RNG),
rng_rank{r}.safetensors (torch and sampling-generator states of each rank), ema.safetensors (the EMA weights,
when trainer.ema is on).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Stateful, TrainablePolicy
from rlr_cli.run_folder import find_latest

REQUIRED = ("adapter", "optimizer.pt", "state.json")
# Keys a resumed run may change without saying so: how long it runs, how it reports, where files live.
FREE_ON_RESUME = ("trainer.resume_from", "trainer.resume_allow", "trainer.max_steps", "trainer.max_samples",
                  "trainer.progress", "trainer.checkpoint_every", "trainer.eval_every", "paths.", "logger.")


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    samples: int = 0  # training trajectories drawn so far, all ranks together
    clipped: int = 0  # steps whose gradient norm exceeded max_grad_norm (clipping biases those updates)


def _rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors


def save_checkpoint(run_dir: Path, state: TrainState, policy: TrainablePolicy, optimizer: Any, scheduler: Any,
                    generator: torch.Generator, estimator: object, scaler: Any, rank: int,
                    barrier: Callable[[], None], tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Every rank calls this; rank 0 writes the shared files (and `tensors`: file name -> tensors, e.g. the
    EMA weights) and publishes the folder by renaming it."""
    final = run_dir / "checkpoints" / f"step_{state.step}"
    scratch = run_dir / "checkpoints" / f".incomplete_step_{state.step}"
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    barrier()
    save_file(_rng_tensors(generator), str(scratch / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        policy.save_adapter(str(scratch / "adapter"))
        torch.save(optimizer.state_dict(), scratch / "optimizer.pt")
        numpy_state: Any = np.random.get_state()  # the legacy tuple (kind, keys, pos, has_gauss, cached)
        payload = {
            "trainer": asdict(state),
            "scheduler": scheduler.state_dict(),
            "estimator": estimator.state_dict() if isinstance(estimator, Stateful) else None,
            "loss_scaler": scaler.state_dict() if scaler is not None else None,
            "python_rng": random.getstate(),
            "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        (scratch / "state.json").write_text(json.dumps(payload))
        for name, values in tensors.items():
            save_file(values, str(scratch / name))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    barrier()
    return final


def load_checkpoint(folder: Path, policy: TrainablePolicy, optimizer: Any, scheduler: Any,
                    generator: torch.Generator, estimator: object, scaler: Any, rank: int) -> TrainState:
    """Restore everything save_checkpoint wrote; a corrupt or partial folder is a UserError."""
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if missing:
        raise UserError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)}); pick another one")
    try:
        payload = json.loads((folder / "state.json").read_text())
        policy.load_adapter(str(folder / "adapter"))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        rng_file = folder / f"rng_rank{rank}.safetensors"
        rng = load_file(str(rng_file if rng_file.exists() else folder / "rng_rank0.safetensors"))
    except UserError:
        raise
    except Exception as error:  # truncated files, bad JSON, wrong shapes: all mean the same to the user
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise UserError(f"checkpoint {folder} cannot be read ({type(error).__name__}: {reason[:200]})") from None
    scheduler.load_state_dict(payload["scheduler"])
    if payload["estimator"] is not None and isinstance(estimator, Stateful):
        estimator.load_state_dict(payload["estimator"])
    if scaler is not None and payload.get("loss_scaler"):
        scaler.load_state_dict(payload["loss_scaler"])
    random.setstate((payload["python_rng"][0], tuple(payload["python_rng"][1]), payload["python_rng"][2]))
    kind, keys, *rest = payload["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(**payload["trainer"])


def resume_point(choice: str | None, run_dir: Path) -> Path | None:
    """The checkpoint folder trainer.resume_from names (latest: of this run folder or its newest sibling)."""
    if choice is None:
        return None
    folder = find_latest(run_dir) if choice == "latest" else Path(choice).expanduser()
    if folder is not None and not folder.is_dir():
        raise UserError(f"trainer.resume_from={choice}: no such checkpoint folder")
    return folder


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(tree, dict) and tree:
        return {key: value for k, v in tree.items() for key, value in _flat(v, f"{prefix}{k}.").items()}
    return {prefix[:-1]: tree}


def check_resume_config(folder: Path, config: dict) -> None:
    """Refuse to resume a checkpoint made with other settings, naming each key that differs, unless
    trainer.resume_allow lists it (a checkpoint outside a run folder has no config to compare)."""
    saved_file = folder.parent.parent / "config.yaml"
    if not saved_file.is_file():
        return
    from omegaconf import OmegaConf

    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_file)))
    now = _flat(config)
    allowed = FREE_ON_RESUME + tuple(config["trainer"].get("resume_allow") or ())
    differs = [key for key in sorted(saved.keys() | now.keys())
               if saved.get(key) != now.get(key) and not key.startswith(allowed)]
    if differs:
        changes = ", ".join(f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in differs[:4])
        changes += f" and {len(differs) - 4} more" if len(differs) > 4 else ""
        raise UserError(f"checkpoint {folder} was made with other settings: {changes}; run with its values, or "
                        f"resume anyway with trainer.resume_allow=[{','.join(differs)}]")


def load_tensors(folder: Path, name: str, key: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the checkpoint; a missing or unreadable one names the config key behind it."""
    file = folder / name
    if not file.exists():
        raise UserError(f"checkpoint {folder} has no {name}: it was written without {key}; resume with the "
                        f"run's own {key}")
    try:
        return load_file(str(file))
    except Exception as error:  # a truncated file
        raise UserError(f"checkpoint {folder}: {name} cannot be read ({type(error).__name__})") from None
