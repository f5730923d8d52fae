"""Estimator mechanics (their statistics are in tests/statistical): baselines, DDPO's tracker and its
batches, rlr_official's two phases, ReFL's stop step, and DDPO's one denoiser call per timestep slot."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from rewards.simple import Saturation
from rlr_cli.build import component
from rlr_cli.errors import UserError
from rlr_cli.estimators.checks import draw_estimates, estimate, flat_gradient
from rlr_cli.estimators.common import leave_one_out_mean
from rlr_cli.estimators.ddpo import PerPromptStatTracker
from rlr_cli.estimators.linear_gaussian import default_problem

PROMPTS = ["a", "b", "c", "d"] * 2


@pytest.fixture
def problem():
    return default_problem()


def backward(term):
    term.backward()


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


def test_ddpo_collects_once_for_its_inner_epochs_and_ppo_metrics(problem):
    """2 inner epochs x 2 steps per pass: one collected batch, 4 updates; off-policy ones clip; state is JSON."""
    policy, reward = problem
    ddpo = component("estimator=ddpo", "estimator.num_inner_epochs=2", "estimator.train_batch_size=4",
                     "estimator.grad_accum=2", "estimator.stat_buffer_size=8", "estimator.stat_min_count=2")
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1e-3)
    updates = ddpo.collect(policy, reward, ["a", "b"] * 8, torch.Generator().manual_seed(0))
    assert len(updates) == 4
    sampled = []
    for update in updates:
        optimizer.zero_grad()
        out = ddpo.update(policy, reward, update, backward)
        optimizer.step()
        sampled.append(out.metrics["sampled"])
    assert sampled == [1.0, 0.0, 0.0, 0.0]
    assert out.metrics["clipfrac"] > 0 and out.metrics["approx_kl"] > 0  # later updates are off-policy
    assert json.loads(json.dumps(ddpo.state_dict()))["stat_tracker"].keys() == {"a", "b"}


def test_rlr_official_trains_each_batch_with_an_fo_then_an_ho_step(problem):
    policy, reward = problem
    est = component("estimator=rlr_official", "estimator.chain_len=2", "estimator.target=null")
    fo, ho = est.collect(policy, reward, PROMPTS, torch.Generator().manual_seed(0))
    first = est.update(policy, reward, fo, backward)
    second = est.update(policy, reward, ho, backward)
    assert first.metrics["phase_ho"] == 0.0 and second.metrics["phase_ho"] == 1.0
    assert len(set(ho.ho_steps)) == 2 and max(ho.ho_steps) < policy.num_steps - 1  # never the last step
    assert all(torch.isfinite(p.grad).all() for p in policy.trainable_parameters())


def test_refl_runs_and_uses_a_late_step(problem):
    policy, reward = problem
    est = component("estimator=refl", "estimator.last_steps=3", "estimator.target=0.0")
    out = estimate(est, policy, reward, PROMPTS[:4], torch.Generator().manual_seed(0))
    assert policy.num_steps - 3 <= out.metrics["stop_step"] <= policy.num_steps - 1
    assert policy.bias.grad.abs().sum() > 0


TINY = ("model=tiny", "model.num_steps=3", "model.eta=1.0", "model.resolution=16", "model.gradient_checkpointing=false",
        "model.lora.rank=2", "model.lora.alpha=2")


def ddpo_on_policy(batch: int):
    return component("estimator=ddpo", "estimator.num_inner_epochs=1", f"estimator.train_batch_size={batch}",
                     "estimator.grad_accum=1", "estimator.clip_range=null", "estimator.advantages=leave_one_out",
                     "estimator.log_prob_reduce=sum", "estimator.timestep_reduce=sum", f"trainer.batch_size={batch}")


def test_ddpo_per_sample_timesteps_match_the_plain_likelihood_ratio(tiny_path):
    """DDPO's per-sample shuffled timesteps (each sample at its own step in one call, CFG cond included)
    give, on-policy and unclipped, exactly sum_i mean_b(-A_b grad log p_i): nothing lost or doubled."""
    policy = component(*TINY, "model.guidance_scale=5.0", "model.lora.target_modules=[to_q,to_k,to_v]")
    params = policy.trainable_parameters()
    ddpo = ddpo_on_policy(batch=4)
    (update,) = ddpo.collect(policy, Saturation(), ["a", "b", "a", "b"], torch.Generator().manual_seed(0))
    ddpo.update(policy, Saturation(), update, backward)
    grouped = flat_gradient(params)
    for p in params:
        p.grad = None
    rollout, adv = update.batch.rollout, update.batch.advantages
    direct = torch.stack([-(adv * policy.step_log_prob(rollout, i, reduce="sum")).mean() for i in range(3)]).sum()
    direct.backward()
    expected = flat_gradient(params)
    # float32 UNet calls on a batch of mixed steps vs one step at a time, and ratio = exp(new - old) ~ 1
    relative = (grouped - expected).norm() / expected.norm()
    assert expected.norm() > 0 and relative < 1e-3, relative


def test_a_ddpo_sub_batch_makes_one_denoiser_call_per_timestep_slot(tiny_path):
    """Each slot's samples sit at different (shuffled) transitions, yet run in one UNet call (x 2 with CFG)."""
    policy = component(*TINY, "model.guidance_scale=1.0")
    ddpo = component("estimator=ddpo", "estimator.train_batch_size=4", "estimator.grad_accum=1",
                     "estimator.num_inner_epochs=1", "trainer.batch_size=4")
    (update,) = ddpo.collect(policy, Saturation(), ["a", "b", "c", "d"], torch.Generator().manual_seed(0))
    (idx, times), = update.sub_batches
    assert len({tuple(times[:, slot].tolist()) for slot in range(3)}) > 1 and len(set(times[:, 0].tolist())) > 1
    calls = []
    unet, forward = policy.family.unet, policy.family.unet.forward

    def counted(sample, timestep, *args, **kwargs):
        calls.append(timestep.tolist())
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = counted
    try:
        ddpo.update(policy, Saturation(), update, backward)
    finally:
        unet.forward = forward
    chain = policy.chain
    assert calls == [chain.timesteps[times[:, slot]].tolist() for slot in range(3)]  # one call per slot


def test_ddpo_batch_advantages_use_numpys_std_as_ddpo_pytorch():
    """Without the per-prompt tracker, (r - mean) / (std + 1e-8) with numpy's ddof 0, clipped at adv_clip_max."""
    import numpy as np

    ddpo = component("estimator=ddpo", "estimator.per_prompt_stat_tracking=false", "estimator.adv_clip_max=5.0")
    u = torch.tensor([1.0, 2.0, 4.0, 9.0])
    expected = (u.numpy() - u.numpy().mean()) / (u.numpy().std() + 1e-8)
    assert ddpo._advantages(u, ["a"] * 4).numpy() == pytest.approx(np.clip(expected, -5, 5), rel=1e-6)


def test_grpo_groups_prompts_and_normalises_within_each_group_as_flow_grpo():
    """batch_size / G prompts, each G times; (r - group mean) / (std + 1e-4) with numpy's std (per group,
    or of the batch), or r - group mean; clipped at adv_clip_max."""
    import numpy as np

    grpo = component("estimator=grpo", "estimator.group_size=3", "trainer.batch_size=6", "estimator.train_batch_size=3")
    assert grpo.groups(["a", "b", "c", "d", "e", "f"]) == ["a", "a", "a", "b", "b", "b"]
    u = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 30.0])
    groups = u.numpy().reshape(2, 3)
    centred = groups - groups.mean(axis=1, keepdims=True)
    expected = {"group": centred / (groups.std(axis=1, keepdims=True) + 1e-4), "global": centred / (u.numpy().std() + 1e-4),
                "none": centred}
    for std, values in expected.items():
        grpo.std = std
        assert grpo.advantages(u).numpy() == pytest.approx(np.clip(values, -5, 5).flatten(), rel=1e-6)


def test_grpo_same_noise_starts_each_group_from_one_x_t(tiny_path):
    """estimator.same_noise (DanceGRPO's init_same_noise): x_T shared within a group, not across groups."""
    policy = component(*TINY)
    grpo = component("estimator=grpo", "estimator.group_size=2", "estimator.same_noise=true", "trainer.batch_size=4",
                     "estimator.train_batch_size=4", "estimator.grad_accum=1")
    (update,) = grpo.collect(policy, Saturation(), ["a", "b", "c", "d"], torch.Generator().manual_seed(0))
    start, final = update.batch.rollout.latents[:, 0], update.batch.rollout.latents[:, -1]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    assert not torch.equal(final[0], final[1])  # the transitions' noise is each sample's own


def test_grpo_ratio_is_one_on_the_first_update_then_moves(tiny_path):
    """Flow-GRPO / DanceGRPO's debug rule: on the batch's first update the policy is the sampler (ratio 1)."""
    policy = component(*TINY)
    grpo = component("estimator=grpo", "estimator.group_size=2", "estimator.num_inner_epochs=2",
                     "estimator.train_batch_size=4", "estimator.grad_accum=1", "trainer.batch_size=4")
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=10.0)
    deviations = []
    for update in grpo.collect(policy, Saturation(), ["a", "b", "c", "d"], torch.Generator().manual_seed(0)):
        optimizer.zero_grad()
        deviations.append(grpo.update(policy, Saturation(), update, backward).metrics["ratio_deviation"])
        optimizer.step()
    assert deviations[0] < 1e-5 < deviations[1]


def test_kl_to_the_reference_is_the_gaussian_kl_to_the_base_model(tiny_path):
    """The reference is the model with its adapter off: 0 before any update; after one, the Gaussian KL
    ||mean_theta - mean_base||^2 / (2 std^2) against a fresh base model, with its gradient, and the
    trainable weights stay trainable."""
    policy, base = component(*TINY), component(*TINY)
    generator = torch.Generator().manual_seed(0)
    rollout = policy.sample(["a cat", "a dog"], generator=generator, grad_steps=[1, 2], kl=True)
    assert rollout.kl is not None and torch.equal(rollout.kl, torch.zeros(2))  # LoRA B starts at 0
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    _, kl = policy.step_log_prob_kl(rollout, 1, reduce="sum")
    x, steps = rollout.latents[:, 1].detach(), torch.tensor([1, 1])
    mean = policy.transition(rollout, 1, x).mean
    with torch.no_grad():
        reference = base.transition(rollout, 1, x).mean
    expected = ((mean - reference) ** 2).flatten(1).sum(1) / (2 * policy.chain.std(steps).float() ** 2)
    assert kl.min() > 0 and torch.allclose(kl, expected, rtol=1e-4)
    params = policy.trainable_parameters()
    ours = torch.autograd.grad(kl.sum(), params, retain_graph=True)
    theirs = torch.autograd.grad(expected.sum(), params)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-8) for a, b in zip(ours, theirs))
    assert all(p.requires_grad for p in params) and len(policy.trainable_parameters()) == len(params)


def test_kl_regularised_estimators_log_kl_zero_before_the_first_update(tiny_path):
    """truncated_bp and grpo with regularizer.kl_beta: the first estimate's kl is 0 (theta = reference)."""
    policy = component(*TINY)
    truncated = component("estimator=truncated_bp", "regularizer.kl_beta=0.1", "estimator.k=2")
    out = truncated(policy, Saturation(), ["a", "b"], torch.Generator().manual_seed(0), backward)
    assert out.metrics["kl"] == 0.0
    grpo = component("estimator=grpo", "regularizer.kl_beta=0.1", "estimator.group_size=2", "trainer.batch_size=4",
                     "estimator.train_batch_size=4", "estimator.grad_accum=1")
    (update,) = grpo.collect(policy, Saturation(), ["a", "b", "c", "d"], torch.Generator().manual_seed(0))
    assert grpo.update(policy, Saturation(), update, backward).metrics["kl"] == 0.0


def test_eval_chain_is_the_ddim_schedule_at_its_own_steps_eta_and_guidance(tiny_path):
    """trainer.eval_sampling: the held-out chain is DDIMScheduler's at those steps; None keeps training's."""
    from diffusers import DDIMScheduler

    policy = component(*TINY)
    assert policy.eval_chain(None, None, None) is policy.chain
    chain = policy.eval_chain(7, 0.0, 2.5)
    scheduler: Any = DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler")
    scheduler.set_timesteps(7)
    assert torch.equal(chain.timesteps, scheduler.timesteps) and chain.guidance_scale == 2.5
    assert bool((chain.std(torch.arange(7)) == 0).all()) and policy.chain.num_steps == 3
    with torch.no_grad():
        rollout = policy.sample(["a cat"], generator=torch.Generator().manual_seed(0), chain=chain)
    assert rollout.latents.shape[1] == 8


def test_ddim_chain_noises_x0_as_diffusers_add_noise(tiny_path):
    """DRaFT-LV's re-noising is the forward process q(x_t | x_0): diffusers' scheduler.add_noise."""
    from diffusers import DDIMScheduler

    policy = component(*TINY)
    scheduler: Any = DDIMScheduler.from_pretrained(tiny_path, subfolder="scheduler")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(policy.chain.timesteps.tolist()):
        ours = policy.chain.noised(torch.tensor([i, i]), x0, noise)
        assert torch.allclose(ours, scheduler.add_noise(x0, noise, torch.tensor([t, t])), atol=1e-6)


def test_draft_lv_renoises_the_sample_n_times_and_runs_the_last_step_on_each(tiny_path):
    """n UNet calls with grad, all at the last timestep, each from its own x_1 = sqrt(a) x_0 + sqrt(1 - a) eps."""
    policy = component(*TINY, "model.guidance_scale=1.0")
    rollouts, calls = [], []
    sample, unet = policy.sample, policy.family.unet
    forward = unet.forward

    def recorded_sample(*args, **kwargs):
        rollouts.append(sample(*args, **kwargs))
        return rollouts[-1]

    def counted(x, timestep, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append((x.detach().clone(), timestep.tolist()))
        return forward(x, timestep, *args, **kwargs)

    policy.sample, unet.forward = recorded_sample, counted
    try:
        out = estimate(component("estimator=draft_lv", "estimator.n=3"), policy, Saturation(), ["a", "b"],
                       torch.Generator().manual_seed(0))
    finally:
        policy.sample, unet.forward = sample, forward
    chain, (rollout,) = policy.chain, rollouts
    t = int(chain.timesteps[-1])
    assert len(calls) == 3 and all(timesteps == [t, t] for _, timesteps in calls)
    a = float(chain.alphas_cumprod[t])
    noises = [(x - a**0.5 * rollout.final) / (1 - a) ** 0.5 for x, _ in calls]
    assert all(0.7 < z.std() < 1.3 and abs(z.mean()) < 0.3 for z in noises)  # 2 x 4 x 8 x 8 standard normals
    assert all((noises[i] - noises[j]).abs().max() > 0.1 for i in range(3) for j in range(i))
    assert out.metrics["draws"] == 3 and flat_gradient(policy.trainable_parameters()).norm() > 0


def test_rlr_state_baseline_scores_the_samplers_own_x0_predictions(tiny_path):
    """The rollout's x0 predictions are the policy's predict_x0 at each transition's input; the state baseline
    adds no denoiser call, and one reward pass per scored anchor (every baseline_every-th transition)."""
    policy = component(*TINY, "model.guidance_scale=1.0")
    prompts = ["a", "b", "a", "b"]
    with torch.no_grad():
        assert policy.sample(prompts, generator=torch.Generator().manual_seed(0)).x0_predictions is None
        rollout = policy.sample(prompts, generator=torch.Generator().manual_seed(0), keep_x0=True)
        for i in range(policy.num_steps):
            direct = policy.predict_x0(rollout, i, rollout.latents[:, i])
            assert torch.allclose(rollout.x0_predictions[:, i], direct, atol=1e-5)

    unet_calls, reward_calls = [], []
    unet, forward = policy.family.unet, policy.family.unet.forward

    def counted(*args, **kwargs):
        unet_calls.append(1)
        return forward(*args, **kwargs)

    class CountedSaturation(Saturation):
        def __call__(self, images, prompts):
            reward_calls.append(len(prompts))
            return super().__call__(images, prompts)

    saturation = CountedSaturation()
    unet.forward = counted
    try:
        counts = {}
        for baseline, every in (("leave_one_out_prompt", 1), ("state", 1), ("state", 2)):
            unet_calls.clear()
            reward_calls.clear()
            rlr = component("estimator=rlr", "estimator.fo_steps=1", f"estimator.baseline={baseline}",
                            f"estimator.baseline_every={every}")
            estimate(rlr, policy, saturation, prompts, torch.Generator().manual_seed(0))
            counts[baseline, every] = len(unet_calls), len(reward_calls)
    finally:
        unet.forward = forward
    plain_unet, plain_reward = counts["leave_one_out_prompt", 1]
    scored = policy.num_steps - 1  # every transition but the FO one carries a likelihood-ratio term
    assert counts["state", 1] == (plain_unet, plain_reward + scored)
    assert counts["state", 2] == (plain_unet, plain_reward + len({i - i % 2 for i in range(scored)}))


def test_rlr_memory_stays_flat_in_t_with_the_state_baseline(tiny_path):
    """Bytes saved for backward by RLR with the state baseline are the same at T = 4 and T = 12 (the baseline is
    scored without grad); full backprop's grow with T (the meter sees the chain)."""
    def peak(num_steps: int, *estimator: str) -> float:
        policy = component("model=tiny", f"model.num_steps={num_steps}", "model.eta=1.0", "model.resolution=16",
                           "model.gradient_checkpointing=false", "model.guidance_scale=1.0")
        return draw_estimates(component(*estimator), policy, Saturation(), ["a", "b"], 1, meter=True)[2]

    rlr = ("estimator=rlr", "estimator.fo_steps=1", "estimator.baseline=state")
    assert peak(12, *rlr) == pytest.approx(peak(4, *rlr), rel=0.01)
    assert peak(12, "estimator=full_bp") > 2 * peak(4, "estimator=full_bp")


def test_rlr_ho_range_and_grad_norm_j_draw_starts_inside_the_range_and_learn_their_law(problem):
    """ho_range keeps every HO start in [a, b]; j=grad_norm measures the HO term's gradient norm per start
    (its moving average survives a checkpoint as JSON) and still hands the HO gradient to backward."""
    policy, reward = problem
    rlr = component("estimator=rlr", "estimator.fo_steps=1", "estimator.h=2", "estimator.ho_range=[2,4]",
                    "estimator.j=grad_norm")
    generator = torch.Generator().manual_seed(0)
    starts = {int(estimate(rlr, policy, reward, PROMPTS, generator).metrics["ho_start"]) for _ in range(40)}
    assert starts == {2, 3, 4} and set(rlr.ho_grad_norms) == starts
    assert all(norm > 0 for norm in rlr.ho_grad_norms.values())
    restored = component("estimator=rlr", "estimator.h=2", "estimator.j=grad_norm")
    restored.load_state_dict(json.loads(json.dumps(rlr.state_dict())))
    assert restored.ho_grad_norms == rlr.ho_grad_norms

    # the measured HO term's gradient is the plain HO term's: the same estimate for the same draws
    plain = component("estimator=rlr", "estimator.fo_steps=1", "estimator.h=2", "estimator.ho_range=[3,3]")
    measured = component("estimator=rlr", "estimator.fo_steps=1", "estimator.h=2", "estimator.ho_range=[3,3]",
                         "estimator.j=grad_norm")
    gradients = []
    for estimator in (plain, measured):
        policy.zero_grad()
        estimate(estimator, policy, reward, PROMPTS, torch.Generator().manual_seed(1))
        gradients.append(flat_gradient(policy.trainable_parameters()))
    assert torch.allclose(*gradients, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", ["[5,3]", "[0,10]"])
def test_rlr_ho_range_outside_the_chain_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"estimator.ho_range=.*a <= b <= model.num_steps - fo_steps - h = 9"):
        component("estimator=rlr", "model=toy", "model.num_steps=12", "estimator.fo_steps=1", "estimator.h=2",
                  f"estimator.ho_range={bad}")


@pytest.mark.parametrize("option", ["estimator.ho_range=[2,4]", "estimator.j=grad_norm"])
def test_choosing_the_ho_start_at_h_1_is_refused_where_it_changes_nothing(option):
    """At h = 1 with latent ZO on every other step, HO and ZO give each transition the same term, whatever j."""
    with pytest.raises(UserError, match="changes nothing at h=1 .* set estimator.h >= 2"):
        component("estimator=rlr", "estimator.h=1", option)
    component("estimator=rlr", "estimator.h=1", "estimator.zo.mode=param", option)  # there j matters


def test_rlr_step_param_zo_perturbs_each_step_by_its_own_noise_level(problem):
    """zo.mode=step_param: theta + sigma * std_i * D_i at ZO step i, D_i independent; with one ZO step it is the
    shared-direction SPSA of scale sigma * std_i, so both give the same gradient from the same direction."""
    from rlr_cli.estimators.rlr import spsa_gradient

    policy, reward = problem
    with torch.no_grad():
        rollout = policy.sample(PROMPTS, generator=torch.Generator().manual_seed(0))
    step, sigma = 5, 1e-3
    std = float(rollout.chain.std(torch.tensor([step]))[0])
    per_step = spsa_gradient(policy, reward, rollout, [step], sigma, True, torch.Generator().manual_seed(3), None, 1.0)
    seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(3)))
    shared_generator = torch.Generator().manual_seed(seed)  # step_param draws D_i from this seed
    shared = spsa_gradient(policy, reward, rollout, [step], sigma * std, False, shared_generator, None, 1.0)
    for a, b in zip(per_step, shared):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_staged_prompts_condition_each_stage_and_rewards_see_the_prompt(tiny_path):
    """DiffCoT: `prompt || coarse || fine` conditions the first half of the chain on coarse and the second on
    fine; the rollout's prompts (what the reward reads) are the first field; a call mixing stages merges rows."""
    from rlr_cli.prompts import PromptSource, StagedPrompt

    policy = component("model=tiny", "model.num_steps=4", "model.eta=1.0", "model.resolution=16",
                       "model.gradient_checkpointing=false", "model.guidance_scale=1.0")
    source = PromptSource(train=["a red circle || a blue square || a green cross", "plain"], train_file=None,
                          eval=None, eval_file=None)
    staged, plain = source.train
    assert isinstance(staged, StagedPrompt) and staged == "a red circle" and plain == "plain"
    assert staged.stages == ("a blue square", "a green cross")

    def rollout(prompts):
        with torch.no_grad():
            return policy.sample(prompts, generator=torch.Generator().manual_seed(0))

    same = rollout([PromptSource(train=["p || q || q"], train_file=None, eval=None, eval_file=None).train[0]])
    assert torch.allclose(same.latents, rollout(["q"]).latents)  # every stage "q": the chain of prompt "q"
    mixed = rollout([staged, staged])
    coarse, fine = rollout(["a blue square"] * 2), rollout(["a green cross"] * 2)
    assert mixed.prompts == ["a red circle"] * 2
    assert torch.allclose(mixed.latents[:, :3], coarse.latents[:, :3])  # transitions 0, 1: the coarse prompt's
    assert not torch.allclose(mixed.latents[:, 3], coarse.latents[:, 3])
    with torch.no_grad():  # sample 0 at transition 0 (coarse), sample 1 at transition 3 (fine): one merged call
        merged = policy.step_log_prob(mixed, torch.tensor([0, 3]))
        fine_on_mixed = policy.step_log_prob(dataclasses.replace(mixed, cond=fine.cond), torch.tensor([3, 3]))
        coarse_on_mixed = policy.step_log_prob(dataclasses.replace(mixed, cond=coarse.cond), torch.tensor([0, 0]))
    assert torch.allclose(merged, torch.stack([coarse_on_mixed[0], fine_on_mixed[1]]))


@pytest.mark.parametrize("bad", ["a || b", "a || || c", " || b || c"])
def test_a_malformed_staged_prompt_is_one_clear_error(bad):
    from rlr_cli.prompts import PromptSource

    with pytest.raises(UserError, match="is not `prompt || stage prompt"):
        PromptSource(train=[bad], train_file=None, eval=None, eval_file=None)
