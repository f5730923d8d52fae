"""`rlr-train model=tiny estimator=shortft_tiny` end to end: the shortcut steps, the saved adapter."""
from __future__ import annotations

import json

from safetensors.torch import load_file

from helpers import rlr_train
from rlr_cli.lora import WEIGHTS
from rlr_cli.shortcut import SHORTCUT_ADAPTER


def test_rlr_train_runs_shortft_on_the_tiny_model(tmp_path):
    """The plain command with the tiny stand-in config (random LoRA built into the cache on first use)."""
    run_dir = tmp_path / "run"
    rlr_train("model=tiny", "estimator=shortft_tiny", "trainer.max_steps=2", "trainer.batch_size=2",
              "trainer.eval_every=2", "trainer.eval_prompts=2", "logger=none", run_dir=run_dir)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "loss" in line]
    assert len(train) == 2 and all(line["shortcut_steps"] == 3 and line["grad_norm"] > 0 for line in train)
    keys = list(load_file(str(run_dir / "adapter" / WEIGHTS)))
    assert keys and not any(SHORTCUT_ADAPTER in key for key in keys)
    assert len(keys) == 2 * 4 * 8  # lora_A + lora_B of to_q, to_k, to_v, to_out.0 in the tiny UNet's 8 attentions
