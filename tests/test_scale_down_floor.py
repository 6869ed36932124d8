"""benchmarks/scale_down_floor.py's MILP and max-flow greedy against brute force on tiny
placements.

The MILP claims the fewest weights received by any placement that reaches a balancedness with
routing shares (continuous). Brute force enumerates every placement (each rank a set of at most
S distinct experts, every expert on some rank) and takes its least heaviest rank from the
transport condition: a peak P can be routed iff every set X of experts has w(X) <= P |N(X)|,
N(X) the ranks holding some expert of X.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("scipy.optimize")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scale_down_floor import fewest_moves, greedy_moves

EPS = 1e-6


def least_peak(sets: tuple[frozenset[int], ...], load: np.ndarray) -> float:
    """The heaviest rank's least load over every routing of ``load`` onto ranks holding
    ``sets``; inf where some expert has no rank."""
    experts = load.size
    worst = 0.0
    for size in range(1, experts + 1):
        for group in itertools.combinations(range(experts), size):
            ranks = sum(1 for held in sets if held.intersection(group))
            if ranks == 0:
                return float("inf")
            worst = max(worst, float(load[list(group)].sum()) / ranks)
    return worst


def brute_force(kept: np.ndarray, load: np.ndarray, target: float) -> int | None:
    ranks, slots = kept.shape
    experts = load.size
    choices = [
        frozenset(c) for k in range(slots + 1) for c in itertools.combinations(range(experts), k)
    ]
    peak = load.sum() / ranks / target
    best = None
    for sets in itertools.product(choices, repeat=ranks):
        if least_peak(sets, load) > peak * (1 + EPS):
            continue
        cost = sum(len(held - set(kept[r].tolist())) for r, held in enumerate(sets))
        best = cost if best is None else min(best, cost)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    experts = draw(st.integers(2, 4))
    slots = draw(st.integers(1, 2))
    least = max(2, -(-experts // slots))  # every expert must fit
    ranks = draw(st.integers(least, max(least, 3)))
    kept = np.full((ranks, slots), -1, dtype=np.int64)
    for r in range(ranks):
        held = draw(st.lists(st.integers(0, experts - 1), max_size=slots, unique=True))
        kept[r, : len(held)] = held
    load = np.array(draw(st.lists(st.integers(1, 9), min_size=experts, max_size=experts)), float)
    target = draw(st.sampled_from([0.3, 0.5, 0.7, 0.85, 1.0]))
    return kept, load, target


@settings(max_examples=40, deadline=None)
@given(instances())
def test_fewest_moves_matches_brute_force(case: tuple[np.ndarray, np.ndarray, float]) -> None:
    kept, load, target = case
    expected = brute_force(kept, load, target)
    floor = fewest_moves(kept, load, target, time_limit=30.0)
    assert floor.found == expected
    if expected is not None:
        assert floor.optimal
        assert floor.bound <= expected + EPS


def test_kept_placement_at_its_own_balancedness_moves_nothing() -> None:
    kept = np.array([[0, 1], [2, 3], [0, 2]])
    load = np.array([4.0, 2.0, 3.0, 1.0])
    peak = least_peak(tuple(frozenset(row.tolist()) for row in kept), load)
    floor = fewest_moves(kept, load, load.sum() / 3 / peak, time_limit=30.0)
    assert floor.found == 0 and floor.optimal


@settings(max_examples=40, deadline=None)
@given(instances(), st.booleans())
def test_greedy_plan_reaches_what_it_claims_and_never_beats_the_optimum(
    case: tuple[np.ndarray, np.ndarray, float], rule: bool
) -> None:
    kept, load, target = case
    greedy = greedy_moves(kept, load, target, rule=rule)
    sets = tuple(frozenset(int(e) for e in row if e >= 0) for row in greedy.slots)
    received = sum(len(held - set(kept[r].tolist())) for r, held in enumerate(sets))
    assert received <= greedy.moves  # a slot written twice counts once in the plan
    reachable = least_peak(sets, load) <= load.sum() / kept.shape[0] / target * (1 + EPS)
    assert greedy.reached == reachable
    if greedy.reached:
        optimum = brute_force(kept, load, target)
        assert optimum is not None and optimum <= received
