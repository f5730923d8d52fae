"""Which parts of the chain and which tensors receive gradients, per estimator."""
from __future__ import annotations

import torch

from rlr_cli.estimators.backprop import FullBackprop, TruncatedBackprop
from rlr_cli.policy import DiffusionPolicy
from rewards.simple import Saturation

LORA = {"rank": 4, "alpha": 4, "init": "gaussian", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def make_policy(tiny_path: str, steps: int = 6) -> DiffusionPolicy:
    policy = DiffusionPolicy(path=tiny_path, num_steps=steps, lora=LORA)
    with torch.no_grad():  # lora_B starts at 0, which would zero every lora_A gradient
        for name, p in policy.named_trainable_parameters().items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return policy


def grads_per_unet_call(policy, estimator) -> list[float]:
    """Run the estimator's backward; return the gradient norm reaching each UNet output, in chain order."""
    norms, original = [], policy.eps

    def recording_eps(x, i, cond):
        out = original(x, i, cond)
        slot = len(norms)
        norms.append(0.0)
        if out.requires_grad:
            out.register_hook(lambda g: norms.__setitem__(slot, norms[slot] + g.norm().item()))
        return out

    policy.eps = recording_eps
    out = estimator(policy, Saturation(), ["a cat", "a dog"], torch.Generator().manual_seed(0))
    out.loss.backward()
    return norms


def test_truncated_bp_reaches_only_the_last_k_unet_calls(tiny_path):
    policy = make_policy(tiny_path)
    norms = grads_per_unet_call(policy, TruncatedBackprop(mode="fixed", k=2))
    assert len(norms) == 6
    assert all(n == 0.0 for n in norms[:4]) and all(n > 0 for n in norms[4:])


def test_full_bp_reaches_every_unet_call(tiny_path):
    policy = make_policy(tiny_path)
    norms = grads_per_unet_call(policy, FullBackprop())
    assert len(norms) == 6 and all(n > 0 for n in norms)


def test_only_lora_tensors_get_gradients(tiny_path):
    policy = make_policy(tiny_path)
    FullBackprop()(policy, Saturation(), ["a cat"], torch.Generator().manual_seed(1)).loss.backward()
    with_grad = {name for name, p in policy.unet.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert all(p.grad is None for p in list(policy.vae.parameters()) + list(policy.text_encoder.parameters()))
    assert all(policy.named_trainable_parameters()[name].grad.abs().sum() > 0 for name in with_grad)


def test_random_truncation_draws_k_from_the_generator():
    estimator = TruncatedBackprop(mode="random_per_trajectory", distribution="uniform", k_min=2, k_max=5)
    draws = [estimator.grad_steps(torch.Generator().manual_seed(s), 10) for s in range(40)]
    lengths = {len(steps) for steps in draws}
    assert lengths <= {2, 3, 4, 5} and len(lengths) > 1
    assert all(steps == list(range(10 - len(steps), 10)) for steps in draws)
    per_step = TruncatedBackprop(mode="random_per_step", distribution="uniform", k_min=1, k_max=10)
    kept = torch.zeros(10)
    for s in range(400):
        for i in per_step.grad_steps(torch.Generator().manual_seed(s), 10):
            kept[i] += 1
    assert kept[-1] == 400 and kept[0] < kept[5] < kept[9]  # step i kept with P(K >= T - i)
