"""A weighted sum of rewards, e.g. RLR's (aesthetic + 15 * hps) / 2 = 0.5 * aesthetic + 7.5 * hps."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from rlr_cli.errors import UserError
from rlr_cli.interfaces import Reward


class WeightedSum:
    """sum_k weight_k * reward_k(images, prompts); images (B,3,H,W) in [0,1] -> (B,).

    components: {name: {weight: float, reward: Reward}}, the rewards already built (the composition
    root builds the nested nodes first). Differentiable exactly when every component is.
    """

    differentiable = True  # before its parts are built: config.reward_is_differentiable checks them too

    def __init__(self, *, components: dict):
        if not components:
            raise UserError("reward weighted: `components` is empty; give at least one {weight, reward}")
        self.components: list[tuple[str, float, Reward]] = []
        for name, entry in components.items():
            if not isinstance(entry, Mapping) or "weight" not in entry or "reward" not in entry:
                raise UserError(f"reward weighted: component {name!r} needs `weight` and `reward` keys")
            reward = entry["reward"]
            if not isinstance(reward, Reward):
                raise UserError(f"reward weighted: component {name!r} `reward` is not a built reward (a `_target_` node)")
            self.components.append((str(name), float(entry["weight"]), reward))
        self.differentiable = all(reward.differentiable for _, _, reward in self.components)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for _, weight, reward in self.components:
            total = total + weight * reward(images, prompts).float()
        return total
