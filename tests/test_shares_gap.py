"""benchmarks/shares_gap.py's linear program: the best routing shares of a placement.

On tiny placements it must equal the transport bound (the least heaviest rank is the largest
w(X) / |N(X)| over sets X of experts, N(X) the ranks holding some expert of X), and it is never
below what ``solve_shares``'s whole units reach on the same placement.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("scipy.optimize")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from planner_sweep import Cell, event_mapping, zipf_load
from shares_gap import best_balance, exact_shares, exact_units

import elastic_ep.eplb.planner as planner_module
import elastic_ep.eplb.repair as repair_module
import elastic_ep.eplb.unit_balance as unit_balance_module
from elastic_ep.eplb import max_units, plan, plan_with_report
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.unit_balance import balance_with_units
from tests.test_scale_down_floor import least_peak


@st.composite
def placements(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A placement of every expert (at most S per rank, none twice on a rank) and its load."""
    experts = draw(st.integers(2, 5))
    per_rank = draw(st.integers(1, 3))
    ranks = draw(st.integers(-(-experts // per_rank), 5))
    slots = np.full((ranks, per_rank), -1, dtype=np.int64)
    order = draw(st.permutations(range(experts)))
    for i, expert in enumerate(order):  # one replica of each first, then extras anywhere
        slots[i // per_rank, i % per_rank] = expert
    for rank in range(ranks):
        for slot in range(per_rank):
            if slots[rank, slot] < 0 and draw(st.booleans()):
                choice = draw(st.integers(0, experts - 1))
                if choice not in slots[rank]:
                    slots[rank, slot] = choice
    load = np.array(draw(st.lists(st.integers(1, 20), min_size=experts, max_size=experts)), float)
    return slots, load


@settings(max_examples=60, deadline=None)
@given(placements())
def test_best_shares_reach_the_transport_bound(case: tuple[np.ndarray, np.ndarray]) -> None:
    slots, load = case
    peak = least_peak(tuple(frozenset(int(e) for e in row if e >= 0) for row in slots), load)
    expected = load.sum() / slots.shape[0] / peak
    assert best_balance(slots, load) == pytest.approx(expected, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(placements())
def test_solver_never_beats_the_best_shares(case: tuple[np.ndarray, np.ndarray]) -> None:
    slots, load = case
    most = max_units(slots.size, load.size)
    units = solve_shares(slots[None], load[None], most)
    reached = balance_with_units(slots[None], load[None], units)[0][0]
    assert reached <= best_balance(slots, load) + 1e-9


@settings(max_examples=60, deadline=None)
@given(placements())
def test_exact_units_follow_the_best_shares(case: tuple[np.ndarray, np.ndarray]) -> None:
    """``exact_units`` (the what-if of ``scale_down_budget.py --exact-shares``) keeps every slot
    at least one unit and the equal split's heaviest rank at most, and lands within two units
    per slot of the best shares: a rank's S slots off by 2 / 64 of their expert's load per
    replica each, which no rank of the best shares carries less of."""
    slots, load = case
    units = exact_units(slots[None], load[None], 1024)
    ones = (slots[None] >= 0).astype(np.int64)
    assert (units[slots[None] >= 0] >= 1).all() and (units[slots[None] < 0] == 0).all()
    got = balance_with_units(slots[None], load[None], units)[0][0]
    assert got >= balance_with_units(slots[None], load[None], ones)[0][0] - 1e-12
    assert got >= best_balance(slots, load) / (1.0 + 2.0 * slots.shape[1] / 64.0) - 1e-9


@pytest.mark.parametrize("nodes", [1, 2])
def test_exact_shares_stand_in_for_every_solve_of_a_movement_aware_plan(nodes: int) -> None:
    """``exact_shares`` (``scale_down_budget.py --exact-shares``) answers every ``solve_shares``
    call a movement-aware plan makes: the repair's (which passes a node row's layer mean) and
    each node's (``node_shares``); every answer is the linear program's."""
    cell = Cell(64, 2, 16, 5, nodes)
    groups = 8 if nodes > 1 else 1
    load = zipf_load(cell.layers, cell.experts)
    previous = plan(load, 16, 5, num_groups=groups, num_nodes=nodes)
    mapping, dead = event_mapping(cell, "down")
    solved: list[int] = []

    def counted(*args: object) -> np.ndarray:
        solved.append(len(args))
        return exact_units(*args)  # type: ignore[arg-type]

    with exact_shares():
        for module in (planner_module, repair_module, unit_balance_module):
            assert module.solve_shares is exact_units
            module.solve_shares = counted
        report = plan_with_report(
            load,
            mapping.new_world_size,
            5,
            num_groups=groups,
            num_nodes=nodes,
            previous=previous,
            rank_mapping=mapping,
            dead_ranks=dead,
        )
    assert solved and max(solved) == 5  # the repair passes the mean and the units to start from
    assert int(report.transfers.sum()) > 0  # a scale-down re-homes the dropped ranks' experts
