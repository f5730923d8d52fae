"""Which parts of the chain and which tensors receive gradients, per estimator."""
from __future__ import annotations

import torch

from rewards.simple import Saturation
from rlr_cli.build import component
from rlr_cli.estimators.checks import estimate


def make_policy(steps: int = 6):
    policy = component("model=tiny", f"model.num_steps={steps}")
    with torch.no_grad():  # lora_B starts at 0, which would zero every lora_A gradient
        for name, p in policy.named_trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return policy


def grads_per_unet_call(policy, estimator) -> list[float]:
    """Run the estimator's backward; return the gradient norm reaching each UNet output, in chain order."""
    norms, original = [], policy.model_output

    def recording(chain, steps, x, cond, recompute):
        out = original(chain, steps, x, cond, recompute)
        slot = len(norms)
        norms.append(0.0)
        if out.requires_grad:
            out.register_hook(lambda g: norms.__setitem__(slot, norms[slot] + g.norm().item()))
        return out

    policy.model_output = recording
    estimate(estimator, policy, Saturation(), ["a cat", "a dog"], torch.Generator().manual_seed(0))
    return norms


def test_truncated_bp_reaches_only_the_last_k_unet_calls(tiny_path):
    policy = make_policy()
    norms = grads_per_unet_call(policy, component("estimator=truncated_bp", "estimator.k=2"))
    assert len(norms) == 6
    assert all(n == 0.0 for n in norms[:4]) and all(n > 0 for n in norms[4:])


def test_full_bp_reaches_every_unet_call(tiny_path):
    policy = make_policy()
    norms = grads_per_unet_call(policy, component("estimator=full_bp"))
    assert len(norms) == 6 and all(n > 0 for n in norms)


def test_only_lora_tensors_get_gradients(tiny_path):
    policy = make_policy()
    estimate(component("estimator=full_bp"), policy, Saturation(), ["a cat"], torch.Generator().manual_seed(1))
    network = policy.family.denoiser
    with_grad = {name for name, p in network.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    frozen = list(policy.family.vae.parameters()) + list(policy.family.text_encoder.parameters())
    assert all(p.grad is None for p in frozen)
    assert all(policy.named_trainable_parameters()[name].grad.abs().sum() > 0 for name in with_grad)


def alignprop_k(num_steps: int, mean: float, std: float) -> int:
    """AlignProp's own rule (sd_pipeline.py): int(N(mean, std)) redrawn until in [1, T - 1]; grads from there on."""
    stop = -1
    while stop >= num_steps or stop < 1:
        stop = int(torch.distributions.Normal(mean, std).sample().item())
    return num_steps - stop


def test_gaussian_truncation_draws_k_as_alignprop_does():
    """K ~ AlignProp's distribution (T = 50, t_stop ~ N(42, 5)): the histograms of 20k draws agree, K = T never
    occurs, and K = 1 is as rare as the Gaussian says (a clamp of round(N(8, 5)) put 9.7 % there)."""
    estimator = component("estimator=truncated_bp", "estimator.mode=random_per_trajectory",
                          "estimator.distribution=gaussian", "estimator.k_mean=8.0", "estimator.k_std=5.0")
    generator, n = torch.Generator().manual_seed(0), 20_000
    ours = torch.tensor([len(estimator.grad_steps(generator, 50)) for _ in range(n)])
    torch.manual_seed(1)
    theirs = torch.tensor([alignprop_k(50, 42.0, 5.0) for _ in range(n)])
    total_variation = 0.5 * (torch.bincount(ours, minlength=51) - torch.bincount(theirs, minlength=51)).abs().sum() / n
    assert total_variation < 0.03, total_variation
    assert ours.min() >= 1 and ours.max() <= 49
    assert 0.015 < (ours == 1).float().mean() < 0.04  # P(49 <= N(42, 5) < 50) = 0.026


def test_random_truncation_draws_k_from_the_generator():
    estimator = component("estimator=truncated_bp", "estimator.mode=random_per_trajectory",
                          "estimator.distribution=uniform", "estimator.k_min=2", "estimator.k_max=5")
    draws = [estimator.grad_steps(torch.Generator().manual_seed(s), 10) for s in range(40)]
    lengths = {len(steps) for steps in draws}
    assert lengths <= {2, 3, 4, 5} and len(lengths) > 1
    assert all(steps == list(range(10 - len(steps), 10)) for steps in draws)
    per_step = component("estimator=truncated_bp", "estimator.mode=random_per_step", "estimator.distribution=uniform",
                         "estimator.k_min=1", "estimator.k_max=10")
    kept = torch.zeros(10)
    for s in range(400):
        for i in per_step.grad_steps(torch.Generator().manual_seed(s), 10):
            kept[i] += 1
    assert kept[-1] == 400 and kept[0] < kept[5] < kept[9]  # step i kept with P(K >= T - i)
