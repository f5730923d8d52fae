"""Offline, wandb off, one tiny-model cache per test session (inherited by subprocesses); the markers of
the three suites follow their folders: tests/unit (unmarked), tests/integration, tests/statistical."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["WANDB_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RLR_CACHE_DIR", tempfile.mkdtemp(prefix="rlr-test-cache-"))

SUITES = {"integration", "statistical"}


def pytest_collection_modifyitems(items):
    for item in items:
        suite = Path(item.fspath).parent.name
        if suite in SUITES:
            item.add_marker(getattr(pytest.mark, suite))


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from rlr_cli.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(os.environ["RLR_CACHE_DIR"], "sd")
