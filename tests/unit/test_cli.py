"""The command line as a user meets it: composition, one-line errors with exit status 2, before any work."""
from __future__ import annotations

from helpers import rlr_train, user_error_line


def test_unknown_estimator_lists_the_choices(tmp_path):
    line = user_error_line(rlr_train("estimator=nope", run_dir=tmp_path, check=False))
    assert "unknown estimator 'nope'" in line and "full_bp" in line and "truncated_bp" in line


def test_wrong_type_unknown_key_and_missing_value_are_one_line(tmp_path):
    cases = {
        "trainer.max_steps=abc": "trainer.max_steps: expected int",
        "estimator.baseline=weird": "estimator.baseline: expected one of 'leave_one_out_prompt'",
        "estimator.kk=3": "estimator.kk: unknown option; valid options: h, fo_steps,",
        "model.lora.rank=???": "missing value for model.lora.rank",
        "estimator=truncated_bp estimator.k=0": "estimator.k=0: must be >= 1",
        "estimator.zo.steps=0": "estimator.zo.steps=0: must be >= 1",
        "estimator.zo.steps=some": "estimator.zo.steps: expected one of 'all' or int",
        "optimizer.lr=-1": "optimizer.lr=-1: must be > 0",
    }
    for overrides, expected in cases.items():
        line = user_error_line(rlr_train(*overrides.split(), run_dir=tmp_path / "run", check=False))
        assert expected in line, (overrides, line)
        assert not (tmp_path / "run").exists()  # stopped before Hydra made the run folder


def test_rules_across_groups_stop_before_any_weight_loads(tmp_path):
    """model.path points nowhere: a loaded model would fail on it, so the rule's message proves the order."""
    cases = {
        "estimator.h=25": "estimator.fo_steps + estimator.h <= model.num_steps, got 3 + 25 > 20",
        "estimator=ddpo trainer.grad_accum=2": "set trainer.grad_accum=1",
        "estimator=ddpo model.eta=0": "model.eta=0.0 makes every step deterministic",
        "estimator=full_bp reward=jpeg_compressibility": "the reward is not differentiable",
    }
    for overrides, expected in cases.items():
        args = [*overrides.split(), "model.path=/nonexistent"]
        line = user_error_line(rlr_train(*args, run_dir=tmp_path / "run", check=False))
        assert expected in line, (overrides, line)
        assert not (tmp_path / "run").exists()


def test_sweep_values_are_each_checked(tmp_path):
    result = rlr_train("-m", "estimator=truncated_bp,nope", run_dir=tmp_path, check=False)
    assert "unknown estimator 'nope'" in user_error_line(result)


def test_target_outside_the_project_is_refused(tmp_path):
    line = user_error_line(rlr_train("reward._target_=shutil.copyfile", run_dir=tmp_path, check=False))
    assert "reward._target_='shutil.copyfile'" in line and "trusted_modules" in line


def test_hub_model_offline_fails_fast_with_the_override(tmp_path):
    line = user_error_line(rlr_train("model=sd15", run_dir=tmp_path, check=False, timeout=300))
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in line and "model.path=" in line


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = rlr_train("--cfg", "job", "estimator=full_bp", run_dir=tmp_path)
    assert "_target_: rlr_cli.estimators.backprop.FullBackprop" in result.stdout
    assert "model:" in result.stdout and "trainer:" in result.stdout
