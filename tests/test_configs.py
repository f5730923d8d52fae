"""Every option of every config group composes, resolves and binds its `_target_` signature."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT, compose_config
from rlr_cli.build import validate
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
    assert {"model", "reward", "estimator", "prompts", "optimizer", "trainer", "logger"} <= groups
    assert len(OPTIONS) >= 14


@pytest.mark.parametrize("option", OPTIONS)
def test_option_composes_and_binds(option):
    plain = validate(compose_config(option))
    group, name = option.split("=")
    if group not in ("experiment", "metrics", "setup", "recipe"):  # presets and metric sets hold several nodes
        assert plain[group]["_target_"]


def test_validation_rejects_a_wrong_type():
    with pytest.raises(UserError, match="trainer.batch_size: expected int"):
        validate(compose_config("trainer.batch_size=four"))
