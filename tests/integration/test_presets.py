"""Every published preset composes and runs 2 steps on the toy model (reward stand-ins where the preset's
reward needs hub weights), with the preset's own estimator settings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import ROOT, SHARED_DATA, build_run
from rewards.standins import hydra_overrides, write_standin
from rlr_cli.estimators.backprop import ReFL
from rlr_cli.trainer import Trainer

PRESETS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
HUB_REWARDS = ("aesthetic", "hps", "pickscore", "imagereward")
# Small enough for CI; everything else (estimator options, eta, guidance, lr, ...) is the preset's. The
# flow-model presets (SD3.5, FLUX) run on their family's tiny stand-in, the others on the toy model.
SMALL = ["model.num_steps=4", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.grad_accum=1",
         "trainer.num_processes=1", "trainer.eval_every=0", "trainer.checkpoint_every=0", "logger=none",
         "trainer.mixed_precision=no"]
FLOW_MODELS = {"_sd35": ["model=tiny_sd3", "model.resolution=64"],
               "_flux": ["model=tiny_flux", "model.resolution=64", "model.sde_window=[0,3]"]}


def small_model(preset: str) -> list[str]:
    return next((model for marker, model in FLOW_MODELS.items() if marker in preset), ["model=toy"])


def test_presets_exist_for_every_reward_and_the_toy_world():
    assert len(PRESETS) >= 35
    for prefix in (*HUB_REWARDS, "toy_aesthetic"):
        assert any(p.startswith(prefix + "_") for p in PRESETS), prefix


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_names_its_setup_and_launch_line(preset):
    text = (ROOT / "configs" / "experiment" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_")
    assert f"# Launch: rlr-train experiment={preset}" in text and ("Reproduces:" in text or "Toy world:" in text)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_two_steps_on_the_toy_model(preset, tmp_path, monkeypatch):
    reward = next((r for r in HUB_REWARDS if preset.startswith(r + "_")), None)
    if reward is not None and not SHARED_DATA.exists():
        pytest.skip(f"published prompt lists not found in {SHARED_DATA}")
    monkeypatch.setenv("RLR_DATA_DIR", str(SHARED_DATA))
    extra = hydra_overrides(write_standin(reward, tmp_path / "weights")) if reward else []
    if "ddpo" in preset or "grpo" in preset:
        extra += ["estimator.train_batch_size=2", "estimator.grad_accum=1"]
    if "grpo" in preset:
        extra += ["estimator.group_size=2"]
    if "diffcot" in preset:  # its ho_range [7, 13] is set on the toy's own 20 steps (4 would be refused)
        extra += ["model.num_steps=20"]
    run = build_run(f"experiment={preset}", *small_model(preset), *SMALL, *extra)
    result = Trainer(run, tmp_path / "run").train()
    lines = [json.loads(line) for line in Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["step"] == 2 and len(lines) == 2
    assert all(line["nonfinite_total"] == 0 for line in lines)


def test_aesthetic_refl_learns_on_a_reward_of_the_aesthetics_scale(tmp_path):
    """ReFL's loss relu(target - r) has no gradient once r > target: the preset's target (10) sits above the
    aesthetic scale (toy_aesthetic scores 3-8, as LAION's do), so every step has a gradient and a loss."""
    run = build_run("experiment=aesthetic_refl", "model=toy", "reward=toy_aesthetic", "prompts=toy", "model.num_steps=10",
                    "trainer.max_steps=8", "trainer.batch_size=4", "trainer.grad_accum=1", "trainer.eval_every=8",
                    "trainer.eval_prompts=32", "trainer.checkpoint_every=0", "logger=none",
                    "optimizer.lr=0.005")  # setup/toy_aesthetic's lr: the preset's 1e-4 is sized for SD 1.4
    assert isinstance(run.estimator, ReFL) and run.estimator.target == 10.0
    Trainer(run, tmp_path / "run").train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert len(train) == 8 and all(line["grad_norm"] > 0 and line["loss"] > 0 for line in train)
    before, after = (json.loads((tmp_path / "run" / "eval" / f"step_{s}.json").read_text()) for s in (0, 8))
    assert after["reward_mean"] > before["reward_mean"] + before["reward_se"]  # same prompts and seeds
