"""Every published reward, on its tiny stand-in, through the real composition and the trainer."""
from __future__ import annotations

import json

import pytest

from helpers import build_run, rlr_train
from rewards.standins import hydra_overrides, write_standin
from rlr_cli.trainer import Trainer

REWARDS = ["aesthetic", "hps", "pickscore", "imagereward", "weighted"]
ONE_STEP = ["model=tiny", "trainer.max_steps=1", "trainer.batch_size=2", "trainer.eval_every=0",
            "trainer.checkpoint_every=0", "logger=none", "model.num_steps=5"]


@pytest.mark.parametrize("name", REWARDS)
def test_reward_stand_in_trains_one_step(name, tmp_path):
    overrides = hydra_overrides(write_standin(name, tmp_path / "weights"))
    run = build_run(*ONE_STEP, f"reward={name}", *overrides)
    result = Trainer(run, tmp_path / "run").train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 1 and metrics["grad_norm"] > 0  # the reward's gradient reached the LoRA
    assert (tmp_path / "run" / "adapter").exists()


def test_reward_stand_in_through_the_command_line(tmp_path):
    overrides = hydra_overrides(write_standin("pickscore", tmp_path / "weights"))
    rlr_train(*ONE_STEP, "reward=pickscore", *overrides, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").exists()
