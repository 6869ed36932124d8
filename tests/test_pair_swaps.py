"""Swap steps over rank pairs (``improve_by_swaps(pairs=k)``) against a brute-force reference."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb.packing import improve_by_swaps
from tests.test_planner_steps import swap_rows


def _pair_best(slots: np.ndarray, weight: np.ndarray, heavy: int, light: int) -> float:
    """Lowest larger load of ranks ``heavy`` and ``light`` (rows of ``slots`` int64 [R, S],
    ``weight`` float64 [R, S]) over every swap or move that keeps each rank's experts distinct,
    by brute force; the heavy rank's load if none improves it."""
    loads = weight.sum(1)
    best = loads[heavy]
    for i, j in itertools.product(range(slots.shape[1]), repeat=2):
        x, y = slots[heavy, i], slots[light, j]
        if (x >= 0 and x in slots[light]) or (y >= 0 and y in slots[heavy]) or x == y:
            continue
        d = weight[heavy, i] - weight[light, j]
        best = min(best, max(loads[heavy] - d, loads[light] + d))
    return float(best)


@st.composite
def pair_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """One row: slots int64 [R, S] (distinct experts per rank, some empty), their loads float64
    [R, S] (distinct rank loads, so the pairs are unambiguous), and k <= R // 2."""
    slots, weight = draw(swap_rows(max_ranks=7))
    ranks = slots.shape[0]
    # Distinct rank loads.
    weight[:, 0] += np.random.default_rng(draw(st.integers(0, 2**16))).random(ranks) * 1e-3
    return slots, weight, draw(st.integers(1, ranks // 2))


@settings(max_examples=200, deadline=None)
@given(pair_rows())
def test_one_pair_step_matches_brute_force(row: tuple[np.ndarray, np.ndarray, int]) -> None:
    """One step lowers each of the k heaviest ranks with its counterpart among the k lightest
    exactly as far as the best swap found by brute force (or leaves the pair alone), keeps
    every rank's experts distinct and moves no replica in or out."""
    slots, weight, pairs = row
    loads = weight.sum(1)
    order = np.argsort(loads, kind="stable")
    new_slots, new_weight = slots[None].copy(), weight[None].copy()
    improve_by_swaps(new_slots, new_weight, max_steps=1, pairs=pairs)
    new_loads = new_weight[0].sum(1)
    for i in range(pairs):
        heavy, light = int(order[-1 - i]), int(order[i])
        expected = _pair_best(slots, weight, heavy, light)
        larger = max(new_loads[heavy], new_loads[light])
        assert np.isclose(larger, min(expected, loads[heavy]), rtol=1e-9)
    for rank in new_slots[0]:
        held = rank[rank >= 0]
        assert len(set(held.tolist())) == held.size
    assert sorted(new_slots[0].ravel().tolist()) == sorted(slots.ravel().tolist())


@settings(max_examples=100, deadline=None)
@given(pair_rows())
def test_steps_stop_with_the_heaviest_rank_stuck(row: tuple[np.ndarray, np.ndarray, int]) -> None:
    """Given steps enough, a row stops only once its heaviest rank has no swap with the
    lightest that lowers it."""
    slots, weight, pairs = row
    new_slots, new_weight = slots[None].copy(), weight[None].copy()
    improve_by_swaps(new_slots, new_weight, max_steps=10_000, pairs=pairs)
    loads = new_weight[0].sum(1)
    heavy, light = int(loads.argmax()), int(loads.argmin())
    if heavy != light:
        best = _pair_best(new_slots[0], new_weight[0], heavy, light)
        assert best >= loads[heavy] * (1 - 1e-9)
