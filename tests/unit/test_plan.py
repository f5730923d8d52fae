"""The memory planner (rlr_cli/plan.py): the estimate's arithmetic, h=auto's choice, and its errors."""
from __future__ import annotations

import pytest

from rlr_cli.build import component
from rlr_cli.errors import UserError
from rlr_cli.interfaces import Graph
from rlr_cli.plan import GB, Costs, auto_h, estimate

MB = 2**20
COSTS = Costs(weights=1000 * MB, trainable=10 * MB, per_step=1 * MB, single=150 * MB, chain=(160 * MB, 360 * MB),
              chain_reward=(300 * MB, 500 * MB), device="cpu", length=3)  # B_h = 100 MB per chained call


def test_a_chain_costs_its_first_call_then_b_h_per_call_and_the_largest_graph_sets_the_peak():
    assert COSTS.per_call == 100 * MB
    assert COSTS.graph(Graph("HO", 1, reward=False, chained=False)) == 150 * MB
    assert COSTS.graph(Graph("HO", 4, reward=False)) == 160 * MB + 3 * 100 * MB
    assert COSTS.graph(Graph("FO", 3, reward=True)) == 300 * MB + 2 * 100 * MB
    peak = estimate(COSTS, [Graph("FO", 3, reward=True), Graph("HO", 4, reward=False)], num_steps=20, ema=True)
    assert peak.parts["largest graph"] == 500 * MB
    assert peak.total == 1000 * MB + 3 * 10 * MB + 10 * MB + 20 * MB + 500 * MB


def test_h_auto_picks_the_largest_h_that_fits_and_says_why_in_one_line():
    rlr = component("estimator=rlr", "estimator.h=auto", "trainer.memory_budget_gb=2", "estimator.fo_steps=3")
    fixed = 1000 * MB + 30 * MB + 20 * MB
    budget = (fixed + 160 * MB + 5 * 100 * MB + 50 * MB) / GB  # room for h = 6 (and 50 MB to spare), not 7
    line = auto_h(rlr, COSTS, num_steps=20, budget_gb=budget, ema=False)
    assert rlr.h == 6 and "\n" not in line
    assert line.startswith(f"estimator.h=auto: h=6, the largest that fits trainer.memory_budget_gb={budget:g}")
    assert "h=7 would need" in line

    rlr = component("estimator=rlr", "estimator.h=auto", "trainer.memory_budget_gb=100", "estimator.fo_steps=3")
    assert "h=17 is the longest sub-chain fo_steps=3 leaves" in auto_h(rlr, COSTS, num_steps=20, budget_gb=100, ema=False)
    assert rlr.h == 17


def test_h_auto_without_room_for_h_1_or_without_a_budget_is_one_clear_error():
    rlr = component("estimator=rlr", "estimator.h=auto", "trainer.memory_budget_gb=1")
    with pytest.raises(UserError, match="not even h=1 fits trainer.memory_budget_gb=1: it needs 1.6"):
        auto_h(rlr, COSTS, num_steps=20, budget_gb=1, ema=False)
    with pytest.raises(UserError, match="estimator.h=auto picks h from a memory budget: set trainer.memory_budget_gb"):
        component("estimator=rlr", "estimator.h=auto")
