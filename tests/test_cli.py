"""The command line as a user meets it: composition, one-line errors with exit status 2."""
from __future__ import annotations

import time

from conftest import rlr_train


def test_unknown_estimator_lists_the_choices(tmp_path):
    result = rlr_train("estimator=nope", run_dir=tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "unknown estimator 'nope'" in lines[0] and "full_bp" in lines[0] and "truncated_bp" in lines[0]


def test_wrong_type_unknown_key_and_missing_value_are_one_line(tmp_path):
    cases = {
        "trainer.max_steps=abc": "trainer.max_steps: expected int",
        "estimator.baseline=weird": "estimator.baseline: expected one of 'leave_one_out_prompt'",
        "estimator.kk=3": "estimator.kk: unknown option; valid options: h, fo_steps,",
        "model.lora.rank=???": "missing value for model.lora.rank",
    }
    for override, expected in cases.items():
        result = rlr_train(override, run_dir=tmp_path / "run", check=False)
        assert result.returncode == 2, override
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before any work


def test_sweep_values_are_each_checked(tmp_path):
    result = rlr_train("-m", "estimator=truncated_bp,nope", run_dir=tmp_path, check=False)
    assert result.returncode == 2 and "unknown estimator 'nope'" in result.stderr


def test_hub_model_offline_fails_fast_with_the_override(tmp_path):
    start = time.monotonic()
    result = rlr_train("model=sd15", run_dir=tmp_path, check=False, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and elapsed < 30
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in result.stderr and "model.path=" in result.stderr
    assert "Traceback" not in result.stderr


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = rlr_train("--cfg", "job", "estimator=full_bp", run_dir=tmp_path)
    assert "_target_: rlr_cli.estimators.backprop.FullBackprop" in result.stdout
    assert "model:" in result.stdout and "trainer:" in result.stdout
