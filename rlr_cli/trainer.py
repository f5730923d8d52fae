"""The training loop on accelerate: sample, score, estimate, step, log, evaluate, checkpoint.

The trainer never knows which estimator it runs: each call returns a loss whose gradient is the
estimate; the trainer averages micro-batches, all-reduces, clips and steps.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlr_cli.build import Run
from rlr_cli.checkpoint import TrainState, find_latest, load_checkpoint, save_checkpoint
from rlr_cli.errors import UserError
from rlr_cli.images import save_grid
from rlr_cli.report import write_report


@dataclass
class TrainerConfig:
    """The `trainer` group. Counts are per process; a step is one optimizer update."""

    max_steps: int = 100
    max_samples: int | None = None  # also stop once this many training trajectories were drawn (all ranks)
    batch_size: int = 4  # prompts per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # None: no clipping
    checkpoint_every: int = 50  # steps; 0: only the final adapter
    eval_every: int = 50  # steps; 0: no evaluation (step 0 and the last step are evaluated when > 0)
    eval_prompts: int = 8  # held-out prompts per evaluation, each with a fixed seed
    eval_batch_size: int = 8
    eval_seed: int = 1234
    resume_from: str | None = None  # latest | path to checkpoints/step_N
    max_nonfinite: int = 5  # consecutive non-finite steps (skipped) before the run stops
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = False  # force the CPU even when a GPU is present
    progress: bool = True  # progress bar on rank 0
    # Several processes: the Hydra job starts `accelerate launch` with these (see rlr_cli/launch.py).
    num_processes: int = 1  # processes per machine (GPUs; on a CPU-only machine, gloo ranks)
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None  # address of machine 0 (multi-node)
    main_process_port: int | None = None  # null: a free port
    accelerate_config: str | None = None  # accelerate config file (DeepSpeed / FSDP), passed as --config_file


class Trainer:
    def __init__(self, run: Run, run_dir: Path):
        from accelerate import Accelerator

        self.run, self.cfg = run, run.trainer
        self.accelerator = Accelerator(cpu=self.cfg.cpu, mixed_precision=self.cfg.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.policy = run.policy.to(self.accelerator.device)
        if hasattr(run.reward, "to"):
            run.reward.to(self.accelerator.device)
        self.params = self.policy.trainable_parameters()
        self.optimizer, self.scheduler = run.optimizer.build(self.params, self.cfg.max_steps)
        self.generator = torch.Generator().manual_seed(run.seed + 1_000_003 * self.rank)
        self.state = TrainState()
        self.run_dir = self._resume(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = run.logger.open(self.run_dir, run.config) if self.is_main else None

    # ---- resume ----------------------------------------------------------------------------------
    def _resume(self, run_dir: Path) -> Path:
        """Restore from trainer.resume_from; the run then continues in the checkpoint's run folder."""
        choice = self.cfg.resume_from
        if choice is None:
            return run_dir
        folder = find_latest(run_dir) if choice == "latest" else Path(choice).expanduser()
        if folder is None:
            self._say(f"resume_from=latest: no checkpoint under {run_dir.parent}, starting fresh")
            return run_dir
        if not folder.is_dir():
            raise UserError(f"trainer.resume_from={choice}: no such checkpoint folder")
        self.state = load_checkpoint(folder, self.policy, self.optimizer, self.scheduler, self.generator,
                                     self.run.estimator, self.rank)
        resumed_dir = folder.parent.parent
        if self.is_main:
            _truncate_metrics(resumed_dir / "metrics.jsonl", self.state.step)
        self._say(f"resumed from {folder} at step {self.state.step}; writing to {resumed_dir}")
        return resumed_dir

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        if cfg.eval_every and self.state.step == 0:
            self.evaluate()
        bar = self._progress_bar()
        checkpoint_due = False
        try:
            while self.state.step < cfg.max_steps and not self._sample_budget_spent():
                metrics = self.train_step()
                self.state.step += 1
                if self.is_main:
                    self.logger.log(metrics, self.state.step)
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", sec=f"{metrics['step_seconds']:.2f}")
                if self.state.nonfinite_in_a_row >= cfg.max_nonfinite:
                    self.stop_nonfinite()
                checkpoint_due |= bool(cfg.checkpoint_every) and self.state.step % cfg.checkpoint_every == 0
                # Estimators that train on a buffered batch over several calls checkpoint between batches.
                if checkpoint_due and getattr(self.run.estimator, "at_cycle_boundary", True):
                    self.checkpoint()
                    checkpoint_due = False
                if cfg.eval_every and (self.state.step % cfg.eval_every == 0 or self.state.step == cfg.max_steps):
                    self.evaluate()
            if cfg.eval_every and self.state.step % cfg.eval_every and self.state.step < cfg.max_steps:
                self.evaluate()  # a sample budget ended the run between evaluations
            self.save_final_adapter()
            self.check_ranks_in_sync()
        except KeyboardInterrupt:
            self._say(f"interrupted at step {self.state.step}: saving a checkpoint")
            self.checkpoint()
            raise
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        if self.is_main and cfg.eval_every:
            print(write_report(self.run_dir), flush=True)
        return {"run_dir": str(self.run_dir), "step": self.state.step}

    def train_step(self) -> dict[str, float]:
        """One optimizer update over grad_accum micro-batches; non-finite updates are skipped."""
        cfg, start = self.cfg, time.perf_counter()
        drawn_before = getattr(self.policy, "trajectories_sampled", 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, rewards, extra = 0.0, [], {}
        for _ in range(cfg.grad_accum):
            prompts = self.run.prompts.sample(cfg.batch_size, self.generator)
            with self.accelerator.autocast():
                out = self.run.estimator(self.policy, self.run.reward, prompts, self.generator)
            self.accelerator.backward(out.loss / cfg.grad_accum)
            loss_sum += out.loss.detach().item() / cfg.grad_accum
            rewards.append(out.rewards.detach().float())
            extra.update(out.metrics)
        self._all_reduce_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm or math.inf)
        rewards = self.accelerator.gather(torch.cat(rewards).to(self.accelerator.device))
        finite = math.isfinite(loss_sum) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.state.nonfinite_in_a_row = 0
        else:
            self._skip_nonfinite(loss_sum, float(grad_norm))
        drawn = torch.tensor(float(getattr(self.policy, "trajectories_sampled", 0) - drawn_before))
        self.state.samples += int(self.accelerator.reduce(drawn.to(self.accelerator.device), "sum").item())
        return {
            **extra,
            "loss": loss_sum,
            "samples_total": float(self.state.samples),
            "peak_mem_mb": peak_memory_mb(),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "nonfinite_total": float(self.state.nonfinite_total),
            "step_seconds": time.perf_counter() - start,
        }

    def _sample_budget_spent(self) -> bool:
        return self.cfg.max_samples is not None and self.state.samples >= self.cfg.max_samples

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.state.nonfinite_in_a_row += 1
        self.state.nonfinite_total += 1
        self._say(f"step {self.state.step + 1}: non-finite loss {loss} / grad norm {grad_norm}, update skipped")

    def stop_nonfinite(self) -> None:
        """Keep the last good weights in a checkpoint, then stop with one clear message."""
        folder = self.checkpoint()
        raise UserError(
            f"{self.state.nonfinite_in_a_row} non-finite steps in a row (trainer.max_nonfinite="
            f"{self.cfg.max_nonfinite}); stopped. The last good weights are in {folder}; "
            f"lower the learning rate or check the reward"
        )

    def _all_reduce_grads(self) -> None:
        """Average gradients of the trainable tensors over ranks (the policy is not DDP-wrapped)."""
        if self.world == 1:
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- evaluation, checkpoints, final adapter -----------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out prompts with fixed seeds (the same every time): grid PNG and JSON, rank 0 only."""
        if not self.is_main:
            return None
        cfg, step = self.cfg, self.state.step
        prompts = self.run.prompts.eval_prompts(cfg.eval_prompts)
        generator = torch.Generator().manual_seed(cfg.eval_seed)
        images, rewards, extra = [], [], {}
        for start in range(0, len(prompts), cfg.eval_batch_size):
            chunk = prompts[start : start + cfg.eval_batch_size]
            rollout = self.policy.sample(chunk, generator=generator)
            batch = self.policy.decode(rollout.final)
            rewards.append(self.run.reward(batch, chunk).float().cpu())
            for name, metric in self.run.metrics.items():
                for key, values in _per_sample(name, metric(batch, chunk)).items():
                    extra.setdefault(key, []).append(values)
            images.append(batch.float().cpu())
        images, rewards = torch.cat(images), torch.cat(rewards)
        result = {
            "step": step, **_stats("reward", rewards), "prompts": prompts, "rewards": rewards.tolist(),
            "metrics": {key: _stats("", torch.cat(values)) for key, values in extra.items()},
        }
        _write_json(self.run_dir / "eval" / f"step_{step}.json", result)
        captions = [f"{p}\nr={r:.3g}" for p, r in zip(prompts, rewards.tolist())]
        save_grid(images, captions, self.run_dir / "samples" / f"step_{step}.png", title=f"step {step}")
        logged = {"eval_reward_mean": result["reward_mean"], "eval_reward_se": result["reward_se"]}
        logged |= {f"eval_{key}": value["mean"] for key, value in result["metrics"].items()}
        self.logger.log(logged, step)
        self.logger.log_images(images, captions, step)
        return result

    def checkpoint(self) -> Path:
        barrier = self.accelerator.wait_for_everyone
        return save_checkpoint(self.run_dir, self.state, self.policy, self.optimizer, self.scheduler,
                               self.generator, self.run.estimator, self.rank, barrier)

    def save_final_adapter(self) -> None:
        """adapter/ in the run folder, written through a temporary folder so it is whole or absent."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            final, scratch = self.run_dir / "adapter", self.run_dir / ".incomplete_adapter"
            shutil.rmtree(scratch, ignore_errors=True)
            self.policy.save_adapter(str(scratch))
            shutil.rmtree(final, ignore_errors=True)
            scratch.rename(final)
        self.accelerator.wait_for_everyone()

    def check_ranks_in_sync(self) -> None:
        """Multi-process runs: every rank must end with the same weights (else gradients were not shared)."""
        if self.world == 1:
            return
        flat = torch.cat([p.detach().flatten().float() for p in self.params]).to(self.accelerator.device)
        gathered = self.accelerator.gather(flat[None])
        spread = (gathered - gathered[0]).abs().max().item()
        if self.is_main:
            _write_json(self.run_dir / "ranks.json", {"num_processes": self.world, "max_weight_difference": spread})
        if spread > 0:
            raise RuntimeError(f"trainable weights differ across ranks by up to {spread}")

    # ---- rank-0 output ---------------------------------------------------------------------------
    def _progress_bar(self):
        from tqdm.auto import tqdm

        disable = not (self.is_main and self.cfg.progress)
        return tqdm(total=self.cfg.max_steps, initial=self.state.step, desc="train", unit="step", disable=disable)

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"rlr-train: {message}", flush=True)


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def _per_sample(name: str, output) -> dict[str, torch.Tensor]:
    """A metric's output, (B,) or {key: (B,)}, as {metric key: (B,) float on the CPU}."""
    if isinstance(output, dict):
        return {f"{name}_{key}": value.float().cpu() for key, value in output.items()}
    return {name: output.float().cpu()}


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """mean, std and standard error of (N,) values; keys prefixed as reward_mean or mean."""
    key = f"{prefix}_" if prefix else ""
    std = values.std().item() if len(values) > 1 else 0.0
    return {f"{key}mean": values.mean().item(), f"{key}std": std, f"{key}se": std / math.sqrt(len(values))}


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(payload, indent=1))
    os.replace(scratch, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a killed run wrote after the checkpoint it is resumed from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))
