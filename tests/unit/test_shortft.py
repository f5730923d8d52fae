"""ShortFT on the tiny random model, with a random LoRA as the shortcut.

The shortcut here is a PLUMBING STAND-IN (random LoRA weights saved in diffusers format): it checks where
gradients go, how many UNet calls a rollout makes and what gets saved, not that a shortcut is any good
(that is scripts/evaluate_shortcut.py's job on the toy model).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import ROOT, compose_config
from rewards.simple import Saturation
from rlr_cli.build import component, instantiate
from rlr_cli.config import validate
from rlr_cli.errors import UserError
from rlr_cli.estimators.checks import estimate
from rlr_cli.lora import WEIGHTS
from rlr_cli.sampling import DDIMChain
from rlr_cli.shortcut import SHORTCUT_ADAPTER, ShortcutChain

PROMPTS = ["a cat", "a dog"]


def make_policy():
    torch.manual_seed(0)
    return component("model=tiny", "model.num_steps=6", "model.eta=1.0", "model.guidance_scale=5.0")


def shortft(*overrides: str):
    """ShortFT with the tiny model's stand-in shortcut (a random rank-8 LoRA of the tiny UNet in diffusers
    format, built into the cache: a plumbing stand-in, not a shortcut)."""
    return component("estimator=shortft_tiny", "model=tiny", *overrides)


@pytest.fixture(scope="module")
def policy(tiny_path):
    """One tiny policy for the module; each test's ShortFT attaches its shortcut anew (replacing the last)."""
    return make_policy()


def shortcut_params(policy):
    return {n: p for n, p in policy.family.denoiser.named_parameters() if f".{SHORTCUT_ADAPTER}." in n}


def run(estimator, policy, prompts=PROMPTS, seed=0):
    return estimate(estimator, policy, Saturation(), prompts, torch.Generator().manual_seed(seed))


def test_gradient_reaches_the_trainable_lora_and_not_the_shortcut(policy):
    policy.family.denoiser.zero_grad(set_to_none=True)
    run(shortft("estimator.k=3"), policy)
    frozen = shortcut_params(policy)
    assert len(frozen) == 2 * (16 + 4 + 8)  # lora_A, lora_B of to_q, to_v (8 attentions), proj_in (4), conv1 (8)
    assert all(not p.requires_grad and p.grad is None for p in frozen.values())
    trainable = policy.named_trainable_parameters()
    assert trainable and not any(f".{SHORTCUT_ADAPTER}." in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    assert sum(p.grad.abs().sum().item() for p in trainable.values()) > 0


@pytest.mark.parametrize("long_steps", [0, 2])
def test_gradient_matches_a_finite_difference(policy, long_steps):
    """d loss / d theta along a random direction, against a central difference of the same (seeded) rollout.

    long_steps = 2 mixes in two long-chain steps without the shortcut: the checkpointed UNet calls are
    recomputed in backward, so each must re-activate its own adapters for this to hold.
    """
    estimator = shortft("estimator.k=2", f"estimator.long_steps={long_steps}", "estimator.guidance_scale=1.0")
    params = policy.trainable_parameters()
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    for p in params:
        p.grad = None
    run(estimator, policy, PROMPTS[:1], seed=3)
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction) if p.grad is not None)
    h, values = 1e-3, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * h * d)
        values.append(run(estimator, policy, PROMPTS[:1], seed=3).loss)
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(sign * h * d)
    numeric = (values[0] - values[1]) / (2 * h)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=2e-2)


def count_unet_calls(policy):
    calls = []
    unet = policy.family.unet
    forward = unet.forward

    def counted(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    unet.forward = counted
    return calls, forward


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_a_training_rollout_makes_k_unet_calls(policy, guidance):
    estimator = shortft("estimator.k=3", f"estimator.guidance_scale={guidance}")
    chain = estimator.attach(policy)
    calls, forward = count_unet_calls(policy)
    try:
        rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0), grad_steps=range(3), chain=chain)
        batch = len(PROMPTS) * (2 if guidance != 1.0 else 1)  # CFG batches the unconditional and text passes
        assert calls == [batch] * 3 and rollout.num_steps == 3
        calls.clear()
        run(estimator, policy)
        assert calls == [batch] * 6  # 3 in the rollout + 3 recomputed by the per-call checkpoints in backward
    finally:
        policy.family.unet.forward = forward


def test_long_chain_samples_and_saved_adapter_ignore_the_shortcut(tiny_path, tmp_path):
    plain, policy = make_policy(), make_policy()  # equal weights (seeded LoRA init)

    def long_chain(p):
        with torch.no_grad():
            return p.sample(PROMPTS, generator=torch.Generator().manual_seed(7)).final

    before = long_chain(policy)
    out = run(shortft("estimator.k=3"), policy)
    assert out.rewards.shape == (2,)
    assert policy.num_steps == 6 and policy.guidance_scale == 5.0
    assert torch.equal(long_chain(policy), before) and torch.equal(before, long_chain(plain))

    policy.save_adapter(str(tmp_path / "with"))
    plain.save_adapter(str(tmp_path / "plain"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "with" / WEIGHTS))
    reference = load_file(str(tmp_path / "plain" / WEIGHTS))
    assert sorted(saved) == sorted(reference) and len(saved) == len(policy.trainable_parameters())
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    assert not any(SHORTCUT_ADAPTER in key for key in saved)


def test_the_shortcut_changes_the_training_rollout(policy):
    """Same noise and k-step chain with and without the shortcut adapter: different images."""
    chain = shortft("estimator.k=3").attach(policy)
    finals = []
    for each in (chain, chain.without_adapter()):
        with torch.no_grad():
            finals.append(policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0), chain=each).final)
    assert (finals[0] - finals[1]).abs().max() > 1e-3


@pytest.mark.parametrize("rule,gamma", [("tcd", 0.3), ("tcd", 0.0), ("lcm", 0.0), ("ddim", 0.0)])
def test_chain_steps_match_the_diffusers_schedulers(tiny_path, rule, gamma):
    """ShortcutChain's x_next = mean + std z equals TCDScheduler / LCMScheduler / DDIM(trailing).step with the same z."""
    from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

    base: Any = DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler")
    chain = ShortcutChain(DDIMChain(DDIMScheduler.from_config(base.config), 50, 1.0), 4, rule, "scheduler", gamma,
                          scheduler_config=base.config)
    reference: Any  # diffusers annotates from_config as maybe returning a tuple
    if rule == "ddim":
        reference = DDIMScheduler.from_config(base.config, timestep_spacing="trailing")
    else:
        reference = (TCDScheduler if rule == "tcd" else LCMScheduler).from_config(base.config)
    reference.set_timesteps(4)
    assert chain.timesteps.tolist() == reference.timesteps.tolist()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(reference.timesteps):
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        kwargs: dict[str, Any] = {"eta": gamma} if rule == "tcd" else {"eta": 0.0} if rule == "ddim" else {}
        if rule != "ddim":
            kwargs["generator"] = torch.Generator().manual_seed(100 + i)
        expected = reference.step(eps, t, x, **kwargs).prev_sample
        steps = torch.full((2,), i)
        ours = chain.mean(steps, x, eps) + float(chain.std(steps)[0]) * z
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        x = expected


def test_even_timesteps_are_a_subset_of_the_long_chain_with_the_same_start(tiny_path):
    from diffusers import DDIMScheduler

    long = DDIMChain(DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler"), 50, 1.0)
    chain = ShortcutChain(long, 4, "ddim", "even")
    assert chain.timesteps.tolist() == [981, 721, 481, 221] and chain.ends == [721, 481, 221, -1]
    mixed = ShortcutChain(long, 4, "ddim", "even", long_steps=2)
    assert mixed.timesteps.tolist() == [981, 741, 501, 261, 21, 1] and mixed.ends[-1] == 21
    with pytest.raises(UserError, match="must descend"):
        ShortcutChain(long, 2, "ddim", [500, 700])


def test_shortcut_chain_noises_x0_as_diffusers_add_noise(tiny_path):
    from diffusers import DDIMScheduler

    scheduler: Any = DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler")
    chain = ShortcutChain(DDIMChain(scheduler, 50, 1.0), 4, "ddim", "even", long_steps=2)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i, t in enumerate(chain.timesteps.tolist()):
        expected = scheduler.add_noise(x0, noise, torch.tensor([t]))
        torch.testing.assert_close(chain.noised(torch.tensor([i]), x0, noise), expected, rtol=1e-5, atol=1e-6)


SD_SHORTCUTS = {"shortft_tcd_sd15": "h1t/TCD-SD15-LoRA", "shortft_lcm_sd15": "latent-consistency/lcm-lora-sdv1-5",
                "shortft_hyper_sd15": "ByteDance/Hyper-SD"}


@pytest.mark.parametrize("option", sorted(SD_SHORTCUTS))
def test_sd15_shortcut_configs_compose_and_fail_offline_with_one_clear_line(option, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plain = validate(compose_config("model=sd15", f"estimator={option}", f"paths.cache_dir={tmp_path}"))
    node = plain["estimator"]
    assert node["shortcut_hub_id"] == SD_SHORTCUTS[option] and node["shortcut_path"] is None
    with pytest.raises(UserError) as error:
        instantiate(node, "estimator")
    message = str(error.value)
    assert "\n" not in message and SD_SHORTCUTS[option] in message and "estimator.shortcut_path=" in message


def test_missing_local_shortcut_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="estimator.shortcut_path=.*no such file"):
        component("estimator=shortft", f"estimator.shortcut_path={tmp_path / 'nope'}")


def test_a_shortcut_of_another_model_is_a_user_error(tiny_path):
    """The toy shortcut on the tiny UNet: one clear line, not a peft traceback."""
    toy_shortcut = ROOT / "rlr_cli" / "assets" / "toy" / "shortcut"
    if not toy_shortcut.exists():
        pytest.skip("no toy shortcut in this checkout")
    with pytest.raises(UserError, match="does not fit this model's UNet"):
        component("estimator=shortft", f"estimator.shortcut_path={toy_shortcut}").attach(make_policy())
