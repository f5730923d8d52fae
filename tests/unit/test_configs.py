"""Every option of every config group composes, resolves and binds its `_target_` signature, and the
defaults of every option live in its YAML file alone."""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing

import pytest

from helpers import ROOT, compose_config
from rlr_cli.config import import_target, is_node, validate
from rlr_cli.errors import UserError

CONFIG_DIR = ROOT / "configs"


def discover() -> list[str]:
    """group=option overrides for every YAML below configs/ (recursively), except Hydra's own groups."""
    found = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONFIG_DIR).as_posix()
        if group != "." and not group.startswith("hydra"):
            found.append(f"{group}={path.stem}")
    return found


OPTIONS = discover()


def test_discovery_finds_every_group():
    groups = {option.split("=")[0] for option in OPTIONS}
    assert {"model", "reward", "estimator", "prompts", "optimizer", "trainer", "logger", "setup", "recipe"} <= groups
    assert len(OPTIONS) >= 14


@pytest.mark.parametrize("option", OPTIONS)
def test_option_composes_and_binds(option):
    plain = validate(compose_config(option), across_groups=False)
    group, name = option.split("=")
    if group in ("model", "reward", "estimator", "prompts", "optimizer", "trainer", "logger"):
        assert plain[group]["_target_"]


def nodes(tree, where=""):
    if is_node(tree):
        yield where, tree
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield from nodes(value, f"{where}.{key}" if where else str(key))


GROUP_OPTIONS = [o for o in OPTIONS if o.split("=")[0] not in ("experiment", "setup", "recipe")]


def project_nodes(option: str):
    """(where, node, target) of every node of the option's group whose target is a project class."""
    plain = validate(compose_config(option), across_groups=False)
    group = option.split("=")[0]
    for where, node in nodes(plain[group] if group in plain else plain, group):
        target = import_target(node["_target_"], where)
        if target.__module__.startswith(("rlr_cli.", "rewards.")):
            yield where, node, target


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_defaults_live_in_the_yaml_alone(option):
    """No option of a project class has a Python default: the YAML file is its one source."""
    for where, node, target in project_nodes(option):
        defaults = [name for name, p in inspect.signature(target).parameters.items()
                    if p.default is not inspect.Parameter.empty and name in node]
        assert not defaults, f"{where}: {node['_target_']} has Python defaults for {defaults}"


FREE_NUMBERS = {"target", "seed", "eval_seed"}  # any value is meaningful: a reward level, a random seed


def unbounded_number(annotation) -> bool:
    """int or float (or either | None) with no Field range."""
    if typing.get_origin(annotation) is typing.Annotated:
        return False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(unbounded_number(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation in (int, float)


def options_of(target) -> dict:
    """Each keyword option of a target with its annotation, nested dataclass fields as `option.field`."""
    hints = typing.get_type_hints(target if inspect.isclass(target) and dataclasses.is_dataclass(target)
                                  else target.__init__ if inspect.isclass(target) else target, include_extras=True)
    found = dict(hints)
    for name, annotation in hints.items():
        for member in (annotation, *typing.get_args(annotation)):
            if dataclasses.is_dataclass(member):
                found |= {f"{name}.{k}": v for k, v in typing.get_type_hints(member, include_extras=True).items()}
    return found


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_number_has_a_range(option):
    """Counts, sizes, rates, probabilities and scales are range-checked by the validation pass."""
    for where, node, target in project_nodes(option):
        free = [name for name, annotation in options_of(target).items() if name.split(".")[0] in node
                and name.split(".")[-1] not in FREE_NUMBERS and unbounded_number(annotation)]
        assert not free, f"{where}: {node['_target_']} takes {free} without a range (rlr_cli/ranges.py)"


def test_validation_rejects_a_wrong_type():
    with pytest.raises(UserError, match="trainer.batch_size: expected int"):
        validate(compose_config("trainer.batch_size=four"))


GLOBAL_PRESETS = sorted((ROOT / "configs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", [p for p in GLOBAL_PRESETS if "regularizer:" in p.read_text()],
                         ids=lambda p: f"{p.parent.name}={p.stem}")
def test_a_presets_run_level_values_survive_composition(path):
    """A recipe / setup / experiment that sets a run-level value of train.yaml (regularizer.kl_beta) wins over
    train.yaml's default (train.yaml's own values come first in its defaults list)."""
    from omegaconf import OmegaConf

    preset = OmegaConf.load(path)
    config = compose_config(f"{path.parent.name}={path.stem}")
    assert config.regularizer.kl_beta == preset.regularizer.kl_beta > 0
