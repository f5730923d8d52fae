"""The training loop on accelerate: sample, score, estimate, step, log, evaluate, checkpoint.

The trainer never knows which estimator it runs. It hands every estimator its backward
(accelerator.backward: loss scaling under fp16, the accumulation average), then all-reduces, clips and
steps. A buffered estimator (DDPO, rlr_official) is driven in its two phases: collect a batch, then
one update per optimizer step; checkpoints fall between batches.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

from rlr_cli import evaluation
from rlr_cli.checkpoint import TrainState, load_checkpoint, load_tensors, resume_point, save_checkpoint
from rlr_cli.ema import EMA, EMAOptions
from rlr_cli.errors import Interrupted, UserError
from rlr_cli.interfaces import Backward, BufferedEstimator, EstimatorOutput
from rlr_cli.prompts import overlong_warning
from rlr_cli.ranges import Count, NonNegativeFloat, Positive, PositiveFloat
from rlr_cli.report import write_report
from rlr_cli.run_folder import RunFolder, write_json

if TYPE_CHECKING:
    from rlr_cli.build import Run


@dataclass(frozen=True)
class EvalSampling:
    """trainer.eval_sampling: the held-out samples' own chain settings; None: the training value."""

    num_steps: Positive | None
    guidance_scale: NonNegativeFloat | None
    eta: NonNegativeFloat | None


@dataclass(frozen=True)
class TrainerConfig:
    """The `trainer` group (configs/trainer/default.yaml holds the values and what each means)."""

    max_steps: Count
    max_samples: Positive | None
    batch_size: Positive
    grad_accum: Positive
    max_grad_norm: Annotated[float, Field(gt=0)] | None
    checkpoint_every: Count
    eval_every: Count
    eval_prompts: Positive
    eval_batch_size: Positive
    eval_seed: int
    eval_sampling: EvalSampling
    ema: EMAOptions
    resume_from: str | None
    resume_allow: list[str]
    max_nonfinite: Positive
    mixed_precision: Literal["no", "bf16", "fp16"]
    cpu: bool
    progress: bool
    num_processes: Positive
    num_machines: Positive
    machine_rank: Count
    main_process_ip: str | None
    main_process_port: Annotated[int, Field(ge=1, le=65535)] | None
    accelerate_config: str | None
    plan: bool
    memory_budget_gb: PositiveFloat | None


EMA_FILE = "ema.safetensors"  # in a checkpoint folder, when trainer.ema is on


class Trainer:
    def __init__(self, run: Run, run_dir: Path):
        from accelerate import Accelerator

        self.run, self.cfg = run, run.trainer
        self.accelerator = Accelerator(cpu=self.cfg.cpu, mixed_precision=self.cfg.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.policy = run.policy.to(self.accelerator.device)
        if getattr(run.estimator, "h", None) == "auto":
            self._say(memory_plan(run, self.policy, full=False))
            if self.world > 1:  # every rank trains with rank 0's choice (each measured its own peaks)
                from accelerate.utils import broadcast_object_list

                estimator: Any = run.estimator  # an RLR (the plan set its h)
                estimator.h = broadcast_object_list([estimator.h])[0]
        self.params = self.policy.trainable_parameters()
        optimizer, self.scheduler = run.optimizer.build(self.params, self.cfg.max_steps)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)  # steps through the fp16 loss scaler
        self.generator = torch.Generator().manual_seed(run.seed + 1_000_003 * self.rank)
        weights = {str(i): p for i, p in enumerate(self.params)}
        self.ema = EMA(weights, self.cfg.ema) if self.cfg.ema.decay is not None else None
        self.state = TrainState()
        self.pending: list[Any] = []  # a buffered estimator's updates still to run on its collected batch
        self.timing: list[float] = []  # seconds of this process's steps, for the ETA
        self.eval_seconds = 0.0  # of the latest evaluation
        self.run_dir = self._resume(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = run.logger.open(self.run_dir, run.config) if self.is_main else None
        self._warn_overlong()
        sampling = self.cfg.eval_sampling
        self.eval_chain = self.policy.eval_chain(sampling.num_steps, sampling.eta, sampling.guidance_scale)

    # ---- resume ----------------------------------------------------------------------------------
    def _resume(self, run_dir: Path) -> Path:
        """Restore from trainer.resume_from; the run then continues in the checkpoint's run folder."""
        folder = resume_point(self.cfg.resume_from, run_dir)
        if folder is None:
            if self.cfg.resume_from is not None:
                self._say(f"resume_from=latest: no checkpoint under {run_dir.parent}, starting fresh")
            return run_dir
        self.state = load_checkpoint(folder, self.policy, self.optimizer, self.scheduler, self.generator,
                                     self.run.estimator, self.accelerator.scaler, self.rank)
        if self.ema is not None:
            self.ema.load_state_dict(load_tensors(folder, EMA_FILE, "trainer.ema.decay"))
        resumed_dir = folder.parent.parent
        if self.is_main:
            RunFolder(resumed_dir).truncate_metrics(self.state.step)
        self._say(f"resumed from {folder} at step {self.state.step}; writing to {resumed_dir}")
        return resumed_dir

    def eval_settings(self) -> dict:
        """The held-out chain's settings (trainer.eval_sampling, else the model's), recorded with every evaluation."""
        chosen, model = vars(self.cfg.eval_sampling), self.run.config["model"]
        return {key: model.get(key) if value is None else value for key, value in chosen.items()}

    def _warn_overlong(self) -> None:
        prompts = self.run.prompts.distinct()
        cut, limit = self.policy.overlong(prompts)
        if cut and self.is_main:
            print(overlong_warning("rlr-train", cut, len(prompts), limit, "the text encoder"), file=sys.stderr, flush=True)

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        bar = self._progress_bar()
        try:
            with StopRequest(self._say) as stop:
                self._loop(bar, stop)
            self.save_final_adapter()
            self.check_ranks_in_sync()
        except OSError as error:
            if error.filename is None:
                raise
            raise UserError(f"cannot write {error.filename} ({error.strerror}); stopped after step "
                            f"{self.state.step}. {self._last_checkpoint()}") from None
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted in step {self.state.step + 1}, which is lost. {self._last_checkpoint()}") from None
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        if self.is_main and self.cfg.eval_every:
            print(write_report(self.run_dir), flush=True)
        return {"run_dir": str(self.run_dir), "step": self.state.step}

    def _loop(self, bar, stop: StopRequest) -> None:
        cfg = self.cfg
        if cfg.eval_every and self.state.step == 0:
            self.evaluate()
        checkpoint_due = False
        while self.state.step < cfg.max_steps and not self._sample_budget_spent():
            if not self.pending and self._all_ranks_agree(stop.requested):  # a step boundary, not mid-batch
                folder = self.checkpoint()
                raise Interrupted(f"stopped by Ctrl-C after step {self.state.step}; its checkpoint is {folder} "
                                  f"(resume: the same command with trainer.resume_from=latest)")
            metrics = self.train_step()
            self.state.step += 1
            if self.ema is not None:
                self.ema.update(self.state.step)
            self._log(metrics, self.state.step)
            bar.update(1)
            self.timing.append(metrics["step_seconds"])
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", sec=f"{metrics['step_seconds']:.2f}", eta=self._eta())
            if self.state.nonfinite_in_a_row >= cfg.max_nonfinite:
                self.stop_nonfinite()
            checkpoint_due |= bool(cfg.checkpoint_every) and self.state.step % cfg.checkpoint_every == 0
            if checkpoint_due and not self.pending:  # between a buffered estimator's batches
                self.checkpoint()
                checkpoint_due = False
            if cfg.eval_every and (self.state.step % cfg.eval_every == 0 or self.state.step == cfg.max_steps):
                self.evaluate()
        if cfg.eval_every and self.state.step % cfg.eval_every and self.state.step < cfg.max_steps:
            self.evaluate()  # a sample budget ended the run between evaluations

    def _all_ranks_agree(self, flag: bool) -> bool:
        """True when any rank has the flag (every rank then takes the same branch)."""
        if self.world == 1:
            return flag
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "max").item())  # type: ignore[union-attr]

    def _last_checkpoint(self) -> str:
        saved = RunFolder(self.run_dir).checkpoints()
        return f"The last complete checkpoint is {saved[-1]}." if saved else "No checkpoint was written."

    # ---- one optimizer step ----------------------------------------------------------------------
    def _backward(self, parts: int) -> Backward:
        """The backward every estimator gets: one of `parts` micro-batches of this optimizer step."""
        def backward(term: Tensor) -> None:
            self.accelerator.backward(term / parts)

        return backward

    def _estimate(self) -> list[EstimatorOutput]:
        """This step's gradient into .grad: grad_accum fresh micro-batches, or a buffered estimator's next update."""
        cfg, estimator, run = self.cfg, self.run.estimator, self.run
        with self.accelerator.autocast():
            if isinstance(estimator, BufferedEstimator):
                if not self.pending:  # collect phase: sample and score a batch, no gradients
                    prompts = run.prompts.sample(cfg.batch_size, self.generator)
                    self.pending = estimator.collect(self.policy, run.reward, prompts, self.generator)
                return [estimator.update(self.policy, run.reward, self.pending.pop(0), self._backward(1))]
            outputs = []
            for _ in range(cfg.grad_accum):
                prompts = run.prompts.sample(cfg.batch_size, self.generator)
                outputs.append(estimator(self.policy, run.reward, prompts, self.generator, self._backward(cfg.grad_accum)))
            return outputs

    def train_step(self) -> dict[str, float]:
        """One optimizer update; non-finite updates are skipped (fp16 overflows: by the loss scaler)."""
        start = time.perf_counter()
        drawn_before = self.policy.trajectories_sampled
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self._estimate()
        loss = sum(out.loss for out in outputs) / len(outputs)
        extra = {key: value for out in outputs for key, value in out.metrics.items()}
        self._all_reduce_grads()
        grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.cfg.max_grad_norm or math.inf) or 0.0)
        batch_rewards = torch.cat([out.rewards.float() for out in outputs]).to(self.accelerator.device)
        rewards: Tensor = self.accelerator.gather(batch_rewards)  # type: ignore[assignment]  (a tensor in, a tensor out)
        self._optimizer_step(loss, grad_norm)
        clipped = self.cfg.max_grad_norm is not None and math.isfinite(grad_norm) and grad_norm > self.cfg.max_grad_norm
        self.state.clipped += clipped
        drawn = torch.tensor(float(self.policy.trajectories_sampled - drawn_before), device=self.accelerator.device)
        self.state.samples += int(self.accelerator.reduce(drawn, "sum").item())  # type: ignore[union-attr]
        return {
            **extra,
            "loss": loss,
            "samples_total": float(self.state.samples),
            "peak_mem_mb": peak_memory_mb(),
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "grad_norm": grad_norm,
            "clipped": float(clipped),
            "clipped_fraction": self.state.clipped / (self.state.step + 1),
            "lr": self.scheduler.get_last_lr()[0],
            "nonfinite_total": float(self.state.nonfinite_total),
            "step_seconds": time.perf_counter() - start,
        }

    def _optimizer_step(self, loss: float, grad_norm: float) -> None:
        scaled = self.accelerator.scaler is not None  # fp16: the scaler skips overflowing steps itself
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite or scaled:
            self.optimizer.step()
        if finite and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
            self.state.nonfinite_in_a_row = 0
        elif scaled and math.isfinite(loss):
            self._say(f"step {self.state.step + 1}: fp16 gradient overflow, step skipped and the loss scale lowered")
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_in_a_row += 1
            self.state.nonfinite_total += 1
            self._say(f"step {self.state.step + 1}: non-finite loss {loss} / grad norm {grad_norm}, update skipped")

    def _sample_budget_spent(self) -> bool:
        return self.cfg.max_samples is not None and self.state.samples >= self.cfg.max_samples

    def stop_nonfinite(self) -> None:
        """Keep the last good weights in a checkpoint, then stop with one clear message."""
        self.pending = []  # the buffered batch is dropped: resume samples a new one
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
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- evaluation, checkpoints, final adapter -----------------------------------------------------
    def evaluate(self) -> dict | None:
        """Held-out prompts with fixed seeds (the same every time): grid PNG and JSON, rank 0 only."""
        if not self.is_main:
            return None
        cfg, step, run = self.cfg, self.state.step, self.run
        start = time.perf_counter()
        prompts = run.prompts.eval_prompts(cfg.eval_prompts)
        with self._averaged():
            result = evaluation.evaluate(self.policy, run.reward, run.metrics, prompts, cfg.eval_seed,
                                         cfg.eval_batch_size, progress=cfg.progress, chain=self.eval_chain)
        record = evaluation.record(result, run.config.get("reward_name", "reward"), step, sampling=self.eval_settings(),
                                   weights="ema" if self.ema is not None else "trained")
        captions = evaluation.write(result, record, self.run_dir / "eval" / f"step_{step}.json",
                                    self.run_dir / "samples" / f"step_{step}.png", title=f"step {step}")
        logged = {"eval_reward_mean": record["reward_mean"], "eval_reward_se": record["reward_se"]}
        logged |= {f"eval_{key}": value["mean"] for key, value in record["metrics"].items()}
        self.eval_seconds = time.perf_counter() - start
        self._log(logged | {"eval_seconds": self.eval_seconds}, step)
        if self.logger is not None:
            self.logger.log_images(result.images, captions, step)
        return record

    def checkpoint(self) -> Path:
        barrier = self.accelerator.wait_for_everyone
        tensors = {EMA_FILE: self.ema.state_dict()} if self.ema is not None else {}
        return save_checkpoint(self.run_dir, self.state, self.policy, self.optimizer, self.scheduler,
                               self.generator, self.run.estimator, self.accelerator.scaler, self.rank, barrier, tensors)

    def _averaged(self):
        """The EMA weights in the policy for a block (evaluation, the final adapter), when EMA is on."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def save_final_adapter(self) -> None:
        """adapter/ in the run folder, written through a temporary folder so it is whole or absent."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            final, scratch = self.run_dir / "adapter", self.run_dir / ".incomplete_adapter"
            shutil.rmtree(scratch, ignore_errors=True)
            with self._averaged():
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
            write_json(self.run_dir / "ranks.json", {"num_processes": self.world, "max_weight_difference": spread})
        if spread > 0:
            raise RuntimeError(f"trainable weights differ across ranks by up to {spread}")

    # ---- rank-0 output ---------------------------------------------------------------------------
    def _progress_bar(self):
        from tqdm.auto import tqdm

        disable = not (self.is_main and self.cfg.progress)
        # tqdm's own remaining time counts steps only; the postfix's eta includes the evaluations to come
        layout = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"
        return tqdm(total=self.cfg.max_steps, initial=self.state.step, desc="train", unit="step", disable=disable,
                    bar_format=layout)

    def _eta(self) -> str:
        """Time left: the remaining steps at this run's mean step time plus the evaluations still due."""
        from tqdm import tqdm

        cfg, step = self.cfg, self.state.step
        due = range(step + 1, cfg.max_steps + 1)
        evals = sum(s % cfg.eval_every == 0 or s == cfg.max_steps for s in due) if cfg.eval_every else 0
        left = len(due) * sum(self.timing) / len(self.timing) + evals * self.eval_seconds
        return tqdm.format_interval(left)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step)

    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"rlr-train: {message}", flush=True)


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop at the next step boundary, with a checkpoint of the steps
    done (so resume is exact); a second Ctrl-C stops at once."""

    def __init__(self, say: Callable[[str], None]):
        self.requested, self.say = False, say

    def __enter__(self) -> StopRequest:
        self.main_thread = threading.current_thread() is threading.main_thread()  # signals reach only it
        if self.main_thread:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.main_thread:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, losing the step)")


def memory_plan(run: Run, policy, full: bool) -> str:
    """The memory planner on the run's own batch size (rlr_cli/plan.py); resolves estimator.h=auto."""
    from rlr_cli.plan import plan

    cfg = run.trainer
    prompts = run.prompts.sample(cfg.batch_size, torch.Generator().manual_seed(run.seed))
    return plan(policy, run.reward, prompts, run.estimator, ema=cfg.ema.decay is not None and not cfg.ema.on_cpu,
                budget_gb=cfg.memory_budget_gb, full=full)


def plan_only(run: Run) -> dict:
    """trainer.plan=true: print the plan and stop before training."""
    from accelerate import Accelerator

    policy = run.policy.to(Accelerator(cpu=run.trainer.cpu).device)
    print(memory_plan(run, policy, full=True), flush=True)
    return {"run_dir": "(none: trainer.plan=true trains nothing)"}


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch, or on the CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB

