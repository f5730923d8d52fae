"""Every estimator on every model family's tiny stand-in (SDXL on DDIM, SD3 and FLUX on the flow SDE), through
the real composition and trainer; the saved LoRA loads into the family's own diffusers pipeline; the hub
configs fail offline with one line naming the hub id and the key, before any weight loads."""
from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import build_run, rlr_train, user_error_line
from rlr_cli.tiny import ensure_tiny_pipeline
from rlr_cli.trainer import Trainer

FAMILIES = ["tiny_sdxl", "tiny_sd3", "tiny_flux"]
TWO_STEPS = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.eval_every=0", "trainer.checkpoint_every=0",
             "logger=none", "reward=saturation", "prompts=tiny"]
ESTIMATORS = {
    "rlr": ["estimator=rlr"],
    "rlr_h2_param": ["estimator=rlr", "estimator.h=2", "estimator.fo_steps=1", "estimator.zo.mode=param"],
    "rlr_official": ["estimator=rlr_official"],
    "ddpo": ["estimator=ddpo", "estimator.train_batch_size=2", "estimator.grad_accum=1"],
    "grpo": ["estimator=grpo", "estimator.group_size=2", "estimator.train_batch_size=2", "estimator.grad_accum=1"],
    "truncated_bp": ["estimator=truncated_bp"],
    "alignprop": ["estimator=truncated_bp", "estimator.mode=random_per_trajectory", "estimator.k_max=3"],
    "truncated_bp_per_step": ["estimator=truncated_bp", "estimator.mode=random_per_step", "estimator.k_max=3"],
    "full_bp": ["estimator=full_bp"],
    "draft_lv": ["estimator=draft_lv"],
    "refl": ["estimator=refl"],
}


VARIANTS = ("rlr_h2_param", "alignprop", "truncated_bp_per_step")  # modes of one estimator: one family is enough
CASES = [(family, estimator) for family in FAMILIES for estimator in ESTIMATORS
         if estimator not in VARIANTS or family == "tiny_sd3"]


@pytest.mark.parametrize("family,estimator", CASES)
def test_every_estimator_trains_on_every_family(family, estimator, tmp_path):
    run = build_run(f"model={family}", *TWO_STEPS, *ESTIMATORS[estimator])
    result = Trainer(run, tmp_path / "run").train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["step"] == 2
    assert all(m["grad_norm"] > 0 and m["grad_norm"] < float("inf") for m in metrics if "grad_norm" in m)
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_grpo_with_kl_and_an_sde_window_on_flow_models(family, tmp_path):
    """Flow-GRPO-Fast's setting: the SDE (and the trained steps) on a window, the ODE elsewhere, a KL term."""
    run = build_run(f"model={family}", *TWO_STEPS, *ESTIMATORS["grpo"], "model.sde_window=[1,3]",
                    "regularizer.kl_beta=0.01")
    Trainer(run, tmp_path / "run").train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "kl" in m]
    assert trained and trained[0]["ratio_deviation"] < 1e-4  # the sampling policy's ratio is 1 on the first update


PIPELINES = {"tiny_sdxl": "StableDiffusionXLPipeline", "tiny_sd3": "StableDiffusion3Pipeline", "tiny_flux": "FluxPipeline"}


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_into_the_familys_pipeline(family, tmp_path):
    import diffusers
    from peft.utils import get_peft_model_state_dict

    run = build_run(f"model={family}", *TWO_STEPS, "estimator=truncated_bp", "trainer.max_steps=1")
    Trainer(run, tmp_path / "run").train()
    denoiser = run.policy.family.denoiser  # type: ignore[attr-defined]  (DiffusionPolicy's)
    trained = {k: v.detach().clone() for k, v in get_peft_model_state_dict(denoiser).items()}
    folder = ensure_tiny_pipeline(os.environ["RLR_CACHE_DIR"], family=family.removeprefix("tiny_"))
    pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(folder)
    pipe.load_lora_weights(str(tmp_path / "run" / "adapter"), adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.unet if family == "tiny_sdxl" else pipe.transformer, adapter_name="trained")
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value)


@pytest.mark.parametrize("model,hub_id", [
    ("sd35_medium", "stabilityai/stable-diffusion-3.5-medium"), ("sd3_medium", "stabilityai/stable-diffusion-3-medium-diffusers"),
    ("sd35_large", "stabilityai/stable-diffusion-3.5-large"), ("flux_dev", "black-forest-labs/FLUX.1-dev"),
    ("flux_schnell", "black-forest-labs/FLUX.1-schnell"), ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_hub_models_offline_exit_2_with_one_line(model, hub_id, tmp_path):
    result = rlr_train(f"model={model}", "estimator=rlr", "reward=saturation", "prompts=tiny", run_dir=tmp_path / "run",
                       check=False, timeout=120)
    line = user_error_line(result)
    assert result.returncode == 2
    assert hub_id in line and "model.path=" in line


def test_shortft_on_a_flow_model_says_why_before_loading(tmp_path):
    result = rlr_train("model=tiny_sd3", "estimator=shortft_tiny", "reward=saturation", "prompts=tiny",
                       run_dir=tmp_path / "run", check=False, timeout=120)
    assert result.returncode == 2 and "needs a DDIM model" in user_error_line(result)
