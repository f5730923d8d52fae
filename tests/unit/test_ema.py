"""trainer.ema: the moving average's arithmetic, its swap into the weights and back, its state."""
from __future__ import annotations

import pytest
import torch

from rlr_cli.ema import EMA, EMAOptions


def weights() -> dict[str, torch.nn.Parameter]:
    return {"0": torch.nn.Parameter(torch.tensor([1.0, 2.0])), "1": torch.nn.Parameter(torch.tensor([[0.5]]))}


def test_average_follows_the_weights_every_k_steps():
    params = weights()
    ema = EMA(params, EMAOptions(decay=0.75, every=2, on_cpu=True))
    expected = {name: p.detach().clone() for name, p in params.items()}
    for step in range(1, 7):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0)
        ema.update(step)
        if step % 2 == 0:
            expected = {name: 0.75 * expected[name] + 0.25 * p.detach() for name, p in params.items()}
        assert all(torch.allclose(ema.average[name], expected[name]) for name in params), step


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly():
    params = weights()
    ema = EMA(params, EMAOptions(decay=0.5, every=1, on_cpu=False))
    with torch.no_grad():
        params["0"].mul_(3.0)
    ema.update(1)
    trained = {name: p.detach().clone() for name, p in params.items()}
    with ema.applied():
        assert torch.equal(params["0"].detach(), ema.average["0"])
    assert all(torch.equal(params[name].detach(), trained[name]) for name in params)
    with pytest.raises(RuntimeError), ema.applied():  # restored even when the block fails
        raise RuntimeError
    assert all(torch.equal(params[name].detach(), trained[name]) for name in params)


def test_state_round_trips_and_refuses_other_weights():
    params = weights()
    ema = EMA(params, EMAOptions(decay=0.9, every=1, on_cpu=True))
    ema.update(1)
    clone = EMA(weights(), EMAOptions(decay=0.9, every=1, on_cpu=True))
    clone.load_state_dict(ema.state_dict())
    assert all(torch.equal(clone.average[k], ema.average[k]) for k in params)
    with pytest.raises(ValueError, match="other weights"):
        clone.load_state_dict({"0": torch.zeros(2)})
