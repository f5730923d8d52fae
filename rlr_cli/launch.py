"""Several processes: the Hydra job writes the resolved config and starts an accelerate group on it.

Each rank runs `python -m rlr_cli.worker CONFIG RUN_DIR` and never composes again, so all ranks share
one run folder and each Hydra multirun job gets its own group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_command(trainer: dict, config_file: Path, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if trainer.get("accelerate_config"):
        command += ["--config_file", trainer["accelerate_config"]]
    else:
        command += ["--multi_gpu", "--dynamo_backend", "no"]
    command += [
        "--num_processes", str(trainer["num_processes"] * trainer["num_machines"]),
        "--num_machines", str(trainer["num_machines"]),
        "--machine_rank", str(trainer["machine_rank"]),
        "--main_process_port", str(trainer["main_process_port"] or free_port()),
        "--mixed_precision", trainer["mixed_precision"],
    ]
    if trainer.get("main_process_ip"):
        command += ["--main_process_ip", trainer["main_process_ip"]]
    return command + ["-m", "rlr_cli.worker", str(config_file), str(run_dir)]


def launch_group(plain: dict, run_dir: Path) -> int:
    """Start the accelerate group for a resolved config (config.yaml already in run_dir); its exit status."""
    trainer = plain["trainer"]
    env = dict(os.environ)
    if trainer["cpu"] or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu this gives a real gloo group on CPU
    command = accelerate_command(trainer, run_dir / "config.yaml", run_dir)
    # Ctrl-C reaches every rank from the terminal; each stops at a step boundary with a checkpoint.
    # This process only waits for them (subprocess.run would kill the group on its KeyboardInterrupt).
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return subprocess.run(command, env=env).returncode
    finally:
        signal.signal(signal.SIGINT, previous)


def inside_group() -> bool:
    return "LOCAL_RANK" in os.environ or "ACCELERATE_PROCESS_INDEX" in os.environ
