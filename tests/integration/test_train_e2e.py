"""End to end on the tiny model: the run folder, kill and resume, the saved adapter, the non-finite guard."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import ROOT, build_run, rlr_train, user_error_line
from rlr_cli.build import component
from rlr_cli.errors import UserError
from rlr_cli.lora import WEIGHTS as LORA_WEIGHTS
from rlr_cli.trainer import Trainer

FAST = ["trainer.batch_size=2", "logger=none", "model.num_steps=6"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_path) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    rlr_train("model=tiny", "estimator=truncated_bp", "reward=saturation", "trainer.max_steps=3",
              "trainer.checkpoint_every=2", "trainer.eval_every=2", "trainer.eval_prompts=4",
              "trainer.eval_sampling.num_steps=4", run_dir=run_dir)
    return run_dir


def test_run_folder_has_everything_design_promises(short_run):
    for name in ("config.yaml", "metrics.jsonl", "adapter/" + LORA_WEIGHTS, "checkpoints/step_2/state.json",
                 "checkpoints/step_2/adapter/" + LORA_WEIGHTS, "checkpoints/step_2/optimizer.pt",
                 "samples/step_0.png", "samples/step_2.png", "samples/step_3.png", "eval/step_3.json",
                 "samples/before_after.png", "reward_curve.png", "summary.txt"):
        assert (short_run / name).exists(), name
    lines = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(line["reward_mean"])) for line in train_lines)
    clipped = [float(line["grad_norm"] > 1.0) for line in train_lines]  # trainer.max_grad_norm's default
    assert [line["clipped"] for line in train_lines] == clipped
    assert train_lines[-1]["clipped_fraction"] == pytest.approx(sum(clipped) / 3)
    assert f"gradient clipped on {sum(clipped) / 3:.0%} of 3 steps" in (short_run / "summary.txt").read_text()
    evaluation = json.loads((short_run / "eval" / "step_3.json").read_text())
    assert len(evaluation["rewards"]) == 4 and not list(short_run.glob("checkpoints/.incomplete*"))
    model = OmegaConf.load(short_run / "config.yaml").model
    assert evaluation["sampling"] == {"num_steps": 4, "guidance_scale": model.guidance_scale, "eta": model.eta}


def test_adapter_loads_into_a_fresh_diffusers_pipeline(short_run, tiny_path):
    """pipe.load_lora_weights(adapter/) reproduces the trained policy's deterministic (eta 0) samples."""
    from diffusers import StableDiffusionPipeline

    trained = component("model=tiny", "model.num_steps=6", "model.eta=0.0")
    trained.load_adapter(str(short_run / "adapter"))
    base = component("model=tiny", "model.num_steps=6", "model.eta=0.0")
    prompts = ["a cat", "a red house"]
    with torch.no_grad():
        ours = trained.sample(prompts, generator=torch.Generator().manual_seed(7)).final
        untrained = base.sample(prompts, generator=torch.Generator().manual_seed(7)).final
    pipe: Any = StableDiffusionPipeline.from_pretrained(tiny_path, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(short_run / "adapter"))
    pipe.set_progress_bar_config(disable=True)
    x_t = torch.randn(trained.family.latent_shape(2), generator=torch.Generator().manual_seed(7))
    theirs = pipe(prompts, num_inference_steps=6, guidance_scale=5.0, eta=0.0, latents=x_t, output_type="latent").images
    training_effect = (ours - untrained).abs().max().item()
    assert training_effect > 1e-4  # the adapter changed the samples...
    assert (ours - theirs).abs().max().item() < training_effect / 50  # ...and diffusers reproduces them


def test_sigkill_after_second_checkpoint_then_resume_is_exact(tmp_path, tiny_path):
    args = [*FAST, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=0", "seed=3"]
    reference = tmp_path / "reference"
    rlr_train(*args, run_dir=reference)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "rlr_cli.cli", *args, f"hydra.run.dir={killed}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900  # a hang guard
    while not (killed / "checkpoints" / "step_4").exists():
        assert process.poll() is None and time.monotonic() < deadline, "run ended before its second checkpoint"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "adapter").exists()  # it really died before finishing

    rlr_train(*args, "trainer.resume_from=latest", run_dir=killed)
    expected = load_file(str(reference / "adapter" / LORA_WEIGHTS))
    resumed = load_file(str(killed / "adapter" / LORA_WEIGHTS))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines the killed run wrote after step 4 were replaced


def test_ema_run_saves_the_average_and_resumes_bit_exact(tmp_path, tiny_path):
    """trainer.ema: the adapter and evaluations use the average, the checkpoint holds it, resume is exact."""
    args = [*FAST, "trainer.checkpoint_every=2", "trainer.eval_every=0", "trainer.ema.decay=0.5", "seed=5"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    rlr_train(*args, "trainer.max_steps=4", run_dir=reference)
    rlr_train(*args, "trainer.max_steps=2", run_dir=stopped)
    rlr_train(*args, "trainer.max_steps=4", "trainer.resume_from=latest", run_dir=stopped)
    for name in ("adapter/" + LORA_WEIGHTS, "checkpoints/step_4/ema.safetensors"):
        expected, resumed = load_file(str(reference / name)), load_file(str(stopped / name))
        assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected), name
    averaged = load_file(str(reference / "adapter" / LORA_WEIGHTS))
    trained = load_file(str(reference / "checkpoints" / "step_4" / "adapter" / LORA_WEIGHTS))
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)  # the saved adapter is the average


def test_corrupt_checkpoint_is_one_clear_error(short_run, tmp_path):
    broken = tmp_path / "run" / "checkpoints" / "step_2"
    broken.parent.mkdir(parents=True)
    os.system(f"cp -r {short_run / 'checkpoints' / 'step_2'} {broken}")
    (broken / "optimizer.pt").write_bytes(b"not a checkpoint")
    result = rlr_train(*FAST, "model=tiny", "estimator=truncated_bp", "reward=saturation", "trainer.max_steps=3",
                       f"trainer.resume_from={broken}", run_dir=tmp_path / "new", check=False)
    assert "cannot be read" in user_error_line(result)


class NaNReward:
    differentiable = True

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_nonfinite_steps_are_skipped_then_stop_with_weights_kept(tmp_path, tiny_path):
    run = build_run(*FAST, "trainer.max_steps=10", "trainer.max_nonfinite=3", "trainer.eval_every=0",
                    "trainer.checkpoint_every=0")
    run.reward = NaNReward()
    policy: Any = run.policy
    before = {k: v.detach().clone() for k, v in policy.named_trainable_parameters().items()}
    trainer = Trainer(run, tmp_path)
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        trainer.train()
    after = policy.named_trainable_parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "checkpoints" / "step_3" / "state.json").exists()


def test_rlr_eval_scores_the_final_adapter_with_several_rewards(short_run, tmp_path):
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "rlr_cli.evaluate", "--run", str(short_run), "model.num_steps=6",
               "eval.rewards=[jpeg_compressibility]", "eval.num_prompts=3", f"eval.out={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())  # the record eval/step_N.json has too
    assert summary["reward"] == "saturation" and len(summary["rewards"]) == 3 and summary["reward_se"] >= 0
    assert set(summary["metrics"]) == {"jpeg_compressibility"}
    assert len(summary["metrics"]["jpeg_compressibility"]["scores"]) == 3
    assert (out / "grid.png").stat().st_size > 1000


def test_plan_prints_the_estimate_and_trains_nothing_and_h_auto_trains_with_the_h_it_chose(tmp_path):
    plan = rlr_train("experiment=toy_aesthetic_rlr", "trainer.plan=true", "trainer.memory_budget_gb=4",
                     run_dir=tmp_path / "plan")
    assert "graph HO: 1 call on its own" in plan.stdout and "graph FO: 1 chained call + decoder + reward" in plan.stdout
    assert "estimated peak:" in plan.stdout and "trainer.memory_budget_gb=4: fits" in plan.stdout
    assert not (tmp_path / "plan").exists()  # nothing trained, no run folder

    auto = rlr_train("experiment=toy_aesthetic_rlr", "estimator.h=auto", "trainer.memory_budget_gb=4", "logger=none",
                     "trainer.max_steps=1", "trainer.eval_every=0", "trainer.checkpoint_every=0", run_dir=tmp_path / "auto")
    line = next(x for x in auto.stdout.splitlines() if "estimator.h=auto" in x)
    assert "h=19, the largest that fits" in line and "h=19 is the longest sub-chain fo_steps=1 leaves" in line
    assert json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
