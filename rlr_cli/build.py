"""The composition root: the only place that turns config nodes into objects.

A node `{_target_: rlr_cli.x.Thing, a: 1, b: {...}}` becomes `Thing(a=1, b=...)`: its nested nodes
are built first (depth first), its other options are bound to Thing's signature (config.bind). Weights
load here, under the run's seed, after config.validate has checked the whole config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlr_cli.config import (
    GROUPS,
    bind,
    compose,
    contains_node,
    import_target,
    is_node,
    to_plain,
    trusted_modules,
    validate,
)
from rlr_cli.interfaces import (
    BufferedEstimator,
    Estimator,
    LoggerFactory,
    Metric,
    OptimizerFactory,
    Prompts,
    Reward,
    TrainablePolicy,
)
from rlr_cli.trainer import TrainerConfig

WEIGHTED_GROUPS = ("model", "reward")  # the groups whose building loads weights


@dataclass
class Run:
    """The built objects of one run."""

    policy: TrainablePolicy
    reward: Reward
    estimator: Estimator | BufferedEstimator
    prompts: Prompts
    optimizer: OptimizerFactory
    trainer: TrainerConfig
    logger: LoggerFactory
    seed: int
    config: dict
    metrics: dict[str, Metric] = field(default_factory=dict)  # held-out metrics besides the reward


def instantiate(value: Any, where: str, trusted: tuple[str, ...] = ()) -> Any:
    """Build every `_target_` node in value (a node, or a dict / list holding nodes), depth first."""
    if isinstance(value, list):
        return [instantiate(v, f"{where}.{i}", trusted) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    built = {k: instantiate(v, f"{where}.{k}" if where else k, trusted) if not k.startswith("_") else v
             for k, v in value.items()}
    if not is_node(value):
        return built
    target = import_target(value["_target_"], where, trusted)
    options = bind(target, value, where)
    return target(**{k: built[k] if contains_node(value.get(k)) else v for k, v in options.items()})


def build(plain: dict) -> Run:
    """Instantiate every group of a validated plain config (weights load here) under the run's seed."""
    from accelerate.utils import set_seed

    seed = int(plain.get("seed", 0))
    set_seed(seed)  # random inits (e.g. LoRA) are the same in every run and rank
    trusted = trusted_modules(plain)
    # Cheap groups first: a bad prompt file stops the run before any weights load.
    order = sorted(GROUPS, key=lambda group: group in WEIGHTED_GROUPS)
    objects = {group: instantiate(plain[group], group, trusted) for group in order}
    metrics = {name: instantiate(node, f"metrics.{name}", trusted) for name, node in (plain.get("metrics") or {}).items()}
    return Run(policy=objects["model"], reward=objects["reward"], estimator=objects["estimator"],
               prompts=objects["prompts"], optimizer=objects["optimizer"], trainer=objects["trainer"],
               logger=objects["logger"], seed=seed, config=plain, metrics=metrics)


def component(*overrides: str) -> Any:
    """One group's object as `rlr-train` would build it, e.g. component("estimator=rlr", "estimator.h=2").

    For tests, scripts and notebooks: the group is the first override's; the config is composed and
    validated whole, so the defaults are exactly the command line's (the rules across groups apply to
    an estimator only).
    """
    group = overrides[0].partition("=")[0].split(".")[0]
    plain = validate(compose(list(overrides)), across_groups=group == "estimator")
    return instantiate(plain[group], group, trusted_modules(plain))


def compose_plain(*overrides: str) -> dict:
    """The resolved, unvalidated config (tools that need a node without building it)."""
    return to_plain(compose(list(overrides)))
