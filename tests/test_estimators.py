"""Estimators against a known gradient (ESTIMATORS.md, "How to check an estimator").

Linear-Gaussian chain (T = 12, sigma 0.6 -> 0.05, closed-form grad J): the unbiased estimators' relative
bias lies within 3 standard errors of 0, the biased ones' beyond 5. Tiny UNet chain (main's tiny
SD-shaped pipeline): the reference is the mean of many full-backprop gradients. SE: see checks.py.
"""
from __future__ import annotations

import pytest
import torch

from rlr_cli.estimators.backprop import DraftLV, FullBackprop, ReFL, TruncatedBackprop
from rlr_cli.estimators.checks import bias_statistics, draw_estimates, projected_bias
from rlr_cli.estimators.common import leave_one_out_mean
from rlr_cli.estimators.ddpo import DDPO, PerPromptStatTracker
from rlr_cli.estimators.linear_gaussian import default_problem
from rlr_cli.estimators.rlr import RLR, RLROfficial

PROMPTS = ["a", "b", "c", "d"] * 8  # B = 32, 8 samples per prompt (leave-one-out per prompt)


def ddpo_on_policy(batch: int) -> DDPO:
    """DDPO reduced to the plain on-policy likelihood-ratio estimator of grad J."""
    return DDPO(
        num_inner_epochs=1, train_batch_size=batch, grad_accum=1, clip_range=None,
        advantages="leave_one_out", log_prob_reduce="sum", timestep_reduce="sum",
    )


@pytest.fixture(scope="module")
def problem():
    torch.set_num_threads(1)
    policy, reward = default_problem()
    exact = torch.cat([g.flatten() for g in policy.exact_gradient(reward)])
    return policy, reward, exact


def test_closed_form_matches_monte_carlo(problem):
    """J in closed form equals the mean reward of 40k sampled trajectories (within 4 SE)."""
    policy, reward, _ = problem
    with torch.no_grad():
        rollout = policy.sample(["a"] * 40_000, generator=torch.Generator().manual_seed(1))
        r = reward(rollout.final, rollout.prompts)
    exact = policy.exact_objective(reward).item()
    assert abs(r.mean().item() - exact) < 4 * r.std().item() / 200


UNBIASED = {
    "full_bp": (lambda T: FullBackprop(), 300),
    "rlr_h1": (lambda T: RLR(h=1), 800),
    "rlr_h2": (lambda T: RLR(h=2), 800),
    "rlr_h4": (lambda T: RLR(h=4), 800),
    "rlr_h2_param": (lambda T: RLR(h=2, zo={"mode": "param"}), 800),
    "rlr_h2_zo3": (lambda T: RLR(h=2, zo={"steps": 3}), 800),  # a weighted random subset of the ZO steps
    "rlr_h2_none_covering": (lambda T: RLR(h=2, fo_steps=T - 2, zo={"mode": "none"}), 300),  # FO + HO cover all
    "rlr_k3_batch_loo": (lambda T: RLR(h=2, fo_steps=3, baseline="leave_one_out_batch"), 800),
    "ddpo_onpolicy": (lambda T: ddpo_on_policy(len(PROMPTS)), 300),
}


@pytest.mark.parametrize("name", list(UNBIASED))
def test_unbiased_on_linear_gaussian(problem, name):
    policy, reward, exact = problem
    make, n = UNBIASED[name]
    estimates, _, _ = draw_estimates(make(policy.num_steps), policy, reward, PROMPTS, n, seed=7)
    stats = bias_statistics(estimates, exact)
    assert stats["rel_bias"] < 3 * stats["rel_bias_se"], stats
    assert stats["rel_bias_se"] < 0.35, f"too few draws to say anything: {stats}"  # the test has power


BIASED = {
    "truncated_bp_k1": lambda T: TruncatedBackprop(k=1),
    "rlr_zo_none": lambda T: RLR(h=1, zo={"mode": "none"}),  # drops the ZO transitions
    "draft_lv": lambda T: DraftLV(n=2),
}


@pytest.mark.parametrize("name", list(BIASED))
def test_biased_on_linear_gaussian(problem, name):
    policy, reward, exact = problem
    estimates, _, _ = draw_estimates(BIASED[name](policy.num_steps), policy, reward, PROMPTS, 200, seed=7)
    stats = bias_statistics(estimates, exact)
    assert stats["rel_bias"] > 5 * stats["rel_bias_se"], stats


def test_leave_one_out_baseline_excludes_the_sample():
    u = torch.tensor([1.0, 3.0, 5.0, 10.0])
    assert torch.allclose(leave_one_out_mean(u, ["p", "p", "p", "q"]), torch.tensor([4.0, 3.0, 2.0, 3.0]))
    assert torch.allclose(leave_one_out_mean(u, None), (u.sum() - u) / 3)


def test_ddpo_stat_tracker_matches_ddpo_pytorch_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0]).numpy()
    adv = tracker.update(["x", "x", "y", "y"], rewards)  # short history: batch statistics
    assert adv == pytest.approx((rewards - rewards.mean()) / (rewards.std() + 1e-6))
    adv = tracker.update(["x", "x", "y", "y"], rewards)  # 4 rewards of x now: its own statistics
    x = [1.0, 2.0, 1.0, 2.0]
    assert adv[:2] == pytest.approx((rewards[:2] - 1.5) / (torch.tensor(x).std(unbiased=False).item() + 1e-6))
    clone = PerPromptStatTracker(buffer_size=4, min_count=3)
    clone.load_state_dict(tracker.state_dict())
    assert clone.update(["y"], rewards[2:3]) == pytest.approx(tracker.update(["y"], rewards[2:3]))


def test_ddpo_buffer_inner_epochs_and_ppo_metrics(problem):
    """2 inner epochs x 2 steps per pass: 4 calls per sampled batch; off-policy calls clip, state is JSON."""
    import json

    policy, reward, _ = problem
    ddpo = DDPO(num_inner_epochs=2, train_batch_size=4, grad_accum=2, stat_buffer_size=8, stat_min_count=2)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)
    saved = [p.detach().clone() for p in policy.trainable_parameters()]
    sampled = []
    for _ in range(4):
        optimizer.zero_grad()
        out = ddpo(policy, reward, ["a", "b"] * 8, generator)
        out.loss.backward()
        optimizer.step()
        sampled.append(out.metrics["sampled"])
    for p, s in zip(policy.trainable_parameters(), saved):
        p.data.copy_(s)
    assert sampled == [1.0, 0.0, 0.0, 0.0] and ddpo.at_cycle_boundary
    assert out.metrics["clipfrac"] > 0 and out.metrics["approx_kl"] > 0  # later calls are off-policy
    assert json.loads(json.dumps(ddpo.state_dict()))["stat_tracker"].keys() == {"a", "b"}


def test_rlr_official_alternates_fo_and_ho(problem):
    policy, reward, _ = problem
    est = RLROfficial(chain_len=2, target=None)
    generator = torch.Generator().manual_seed(0)
    first = est(policy, reward, PROMPTS[:8], generator)
    assert first.metrics["phase_ho"] == 0.0 and not est.at_cycle_boundary
    first.loss.backward()
    second = est(policy, reward, PROMPTS[:8], generator)
    second.loss.backward()
    assert second.metrics["phase_ho"] == 1.0 and est.at_cycle_boundary
    assert all(torch.isfinite(p.grad).all() for p in policy.trainable_parameters())
    for p in policy.trainable_parameters():
        p.grad = None


def test_refl_runs_and_uses_a_late_step(problem):
    policy, reward, _ = problem
    out = ReFL(last_steps=3, target=0.0)(policy, reward, PROMPTS[:4], torch.Generator().manual_seed(0))
    assert policy.num_steps - 3 <= out.metrics["stop_step"] <= policy.num_steps - 1
    out.loss.backward()
    assert policy.bias.grad.abs().sum() > 0
    for p in policy.trainable_parameters():
        p.grad = None


# ---- tiny UNet chain ---------------------------------------------------------------------------------
# main's tiny SD-shaped pipeline: T = 4 DDIM steps (eta 1: sigma 0.78, 0.52, 0.041, 0.021), 16 px, LoRA
# r=2 (gaussian init), saturation reward, B = 16. The reference is the mean of 60 full-backprop
# gradients; bias is measured along the reference's direction (checks.projected_bias), where the
# likelihood-ratio noise of ~5k LoRA weights is small enough to test in seconds. RLR runs with
# fo_steps = 2: a likelihood ratio at sigma 0.04 / 0.02 has a variance no CPU test can average away.
TINY_BATCH, TINY_REFERENCE = 16, 60


@pytest.fixture(scope="module")
def tiny(tiny_path):
    from rewards.simple import Saturation
    from rlr_cli.policy import DiffusionPolicy

    torch.set_num_threads(1)
    policy = DiffusionPolicy(
        path=tiny_path, num_steps=4, eta=1.0, guidance_scale=1.0, resolution=16,
        gradient_checkpointing=False,
        lora={"rank": 2, "alpha": 2, "init": "gaussian", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
    )
    reward = Saturation()
    prompts = ["a red circle", "a blue square"] * (TINY_BATCH // 2)
    reference, _, _ = draw_estimates(FullBackprop(), policy, reward, prompts, TINY_REFERENCE, seed=100)
    return policy, reward, prompts, reference


TINY_UNBIASED = {
    "full_bp": (lambda: FullBackprop(), 30),
    "rlr_k2_h1": (lambda: RLR(h=1, fo_steps=2), 60),
}


@pytest.mark.parametrize("name", list(TINY_UNBIASED))
def test_unbiased_on_tiny_unet(tiny, name):
    policy, reward, prompts, reference = tiny
    make, n = TINY_UNBIASED[name]
    estimates, _, _ = draw_estimates(make(), policy, reward, prompts, n, seed=1)
    stats = projected_bias(estimates, reference)
    assert abs(stats["rel_bias_v"]) < 3 * stats["rel_bias_v_se"], stats
    assert stats["rel_bias_v_se"] < 0.5, f"too few draws to say anything: {stats}"


def test_truncated_bp_biased_on_tiny_unet(tiny):
    policy, reward, prompts, reference = tiny
    estimates, _, _ = draw_estimates(TruncatedBackprop(k=1), policy, reward, prompts, 20, seed=1)
    stats = projected_bias(estimates, reference)
    assert abs(stats["rel_bias_v"]) > 5 * stats["rel_bias_v_se"], stats


def test_ddpo_per_sample_timesteps_match_the_plain_likelihood_ratio(tiny_path):
    """DDPO's per-sample shuffled timesteps (rollouts split by timestep, CFG cond included) give, on-policy
    and unclipped, exactly sum_i mean_b(-A_b grad log p_i): the regrouping loses and doubles nothing."""
    from rewards.simple import Saturation
    from rlr_cli.estimators.checks import flat_gradient
    from rlr_cli.policy import DiffusionPolicy

    policy = DiffusionPolicy(
        path=tiny_path, num_steps=3, eta=1.0, guidance_scale=5.0, resolution=16, gradient_checkpointing=False,
        lora={"rank": 2, "alpha": 2, "init": "gaussian", "target_modules": ["to_q", "to_k", "to_v"]},
    )
    params = policy.trainable_parameters()
    ddpo = ddpo_on_policy(batch=4)
    ddpo(policy, Saturation(), ["a", "b", "a", "b"], torch.Generator().manual_seed(0)).loss.backward()
    grouped = flat_gradient(params)
    for p in params:
        p.grad = None
    rollout, adv = ddpo._buffer["rollout"], ddpo._buffer["advantages"]
    direct = sum(-(adv * policy.step_log_prob(rollout, i, reduce="sum")).mean() for i in range(3))
    direct.backward()
    expected = flat_gradient(params)
    # float32 UNet calls on sub-batches vs the whole batch, and ratio = exp(new - old) ~ 1, differ slightly
    assert expected.norm() > 0 and (grouped - expected).norm() < 1e-3 * expected.norm(), (grouped - expected).norm() / expected.norm()
