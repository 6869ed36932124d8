"""The movement-aware repair measured with routing shares (eplb/repair.py), its swaps carrying
each slot's share (eplb/repair_swaps.py) and the group trades of hierarchical repairs
(hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb.hierarchical import _trade_groups
from elastic_ep.eplb.incremental import drop_duplicates
from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.repair import _count_bound, repair
from elastic_ep.eplb.repair_swaps import received_count, swap_towards
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.unit_balance import (
    balance_with_units,
    carried_units,
    followed_units,
    shared_balance,
    unit_totals,
)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """(slots int64 [B, R, S] with every expert placed and none twice on a rank, load float64
    [B, E], max units)."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rows, ranks, per_rank = (
        draw(st.integers(1, 3)),
        draw(st.integers(2, 6)),
        draw(st.integers(2, 4)),
    )
    experts = draw(st.integers(2, ranks * per_rank))
    load = rng.lognormal(0, 1.2, (rows, experts)) * (rng.random((rows, experts)) > 0.1)
    slots = np.full((rows, ranks * per_rank), -1, dtype=np.int64)
    for b in range(rows):
        cells = rng.permutation(ranks * per_rank)
        slots[b, cells[:experts]] = np.arange(experts)  # every expert once
        extra = cells[experts:][rng.random(cells.size - experts) < 0.6]
        slots[b, extra] = rng.integers(0, experts, extra.size)
    slots = slots.reshape(rows, ranks, per_rank)
    slots = drop_duplicates(slots)
    return slots, load, max_units(ranks * per_rank, experts)


@settings(max_examples=80, deadline=None)
@given(layouts(), st.integers(0, 2**16))
def test_swaps_carrying_shares_keep_units_valid_and_exact(
    layout: tuple[np.ndarray, np.ndarray, int], seed: int
) -> None:
    """Swaps that carry each slot's share load: the units recovered from the carried loads
    keep every expert's total, give every occupied slot >= 1 unit, reproduce the carried rank
    loads, and the heaviest rank never rises."""
    slots, load, most = layout
    units = solve_shares(slots, load, most)
    before, weight = balance_with_units(slots, load, units)
    totals = unit_totals(slots, load.shape[1], units)
    peak = weight.sum(2).max(1)
    moved = slots.copy()
    kept = np.random.default_rng(seed).permutation(slots, axis=1)
    target = np.ones(slots.shape[0])
    budget = np.full(slots.shape[0], slots[0].size)
    swap_towards(moved, kept, load, target, budget, 8, slot_weight=weight)
    carried = carried_units(moved, load, weight, totals)
    assert ((carried >= 1) == (moved >= 0)).all()
    assert np.array_equal(unit_totals(moved, load.shape[1], carried), totals)
    after, recomputed = balance_with_units(moved, load, carried)
    np.testing.assert_allclose(recomputed.sum(2), weight.sum(2), rtol=1e-9, atol=1e-9)
    assert (weight.sum(2).max(1) <= peak * (1 + 1e-12)).all()
    assert (after >= before - 1e-9).all()


@settings(max_examples=80, deadline=None)
@given(layouts(), st.integers(0, 2**16))
def test_units_follow_their_replicas_through_swaps_by_the_equal_split(
    layout: tuple[np.ndarray, np.ndarray, int], seed: int
) -> None:
    """After swaps that move slots without their units (by the equal split), the followed
    units keep every expert's total and multiset of units, leave every slot that kept its
    expert as it was, give an expert that moved one replica that replica's units, and 0 to
    empty slots."""
    slots, load, _ = layout
    rng = np.random.default_rng(seed)
    units = np.where(slots >= 0, rng.integers(1, 65, slots.shape), 0)
    moved = slots.copy()
    kept = rng.permutation(slots, axis=1)
    target = np.ones(slots.shape[0])
    budget = np.full(slots.shape[0], slots[0].size)
    swap_towards(moved, kept, load, target, budget, 8)
    followed = followed_units(slots, moved, units)
    assert ((followed >= 1) == (moved >= 0)).all() and (followed[moved < 0] == 0).all()
    same = moved == slots
    assert np.array_equal(followed[same], units[same])
    for row in range(slots.shape[0]):
        for expert in range(load.shape[1]):
            was, now = slots[row] == expert, moved[row] == expert
            assert sorted(units[row][was]) == sorted(followed[row][now])
            left, came = was & ~now, now & ~was
            if left.sum() == 1:
                assert followed[row][came] == units[row][left]


@settings(max_examples=80, deadline=None)
@given(layouts())
def test_count_bound_is_an_upper_bound_of_any_shares(
    layout: tuple[np.ndarray, np.ndarray, int],
) -> None:
    """No routing units do better than the replica counts allow."""
    slots, load, most = layout
    assert (shared_balance(slots, load, most)[0] <= _count_bound(slots, load) + 1e-9).all()


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(0, 2**16), st.floats(0.0, 1.0), st.booleans())
def test_repair_with_shares_is_valid_and_stops_at_the_fewest_moves(
    layout: tuple[np.ndarray, np.ndarray, int], seed: int, goal: float, reachable: bool
) -> None:
    """Every expert placed, none twice on a rank; units >= 1 exactly on occupied slots and
    never worse than the equal split of the result; transfers within the budget beyond the
    experts without a replica; a target already met after placing those experts and filling
    the empty slots (target 0) moves no more weights than those."""
    slots, load, most = layout
    rng = np.random.default_rng(seed)
    kept = np.where(rng.random(slots.shape) < 0.3, -1, slots)
    rows, ranks, per_rank = slots.shape
    counts = replica_counts(load, ranks * per_rank, ranks)
    target = np.full(rows, goal if reachable else 0.0)
    budget = np.full(rows, ranks * per_rank)
    out, units = repair(load, kept, target, budget, counts, most)
    assert units is not None
    for b in range(rows):
        row = out[b]
        assert set(range(load.shape[1])) <= set(row[row >= 0].tolist())
        for rank in row:
            held = rank[rank >= 0]
            assert held.size == np.unique(held).size
    assert ((units >= 1) == (out >= 0)).all()
    equal = balance_with_units(out, load, (out >= 0).astype(np.int64))[0]
    assert (balance_with_units(out, load, units)[0] >= equal - 1e-12).all()
    orphans = np.array([load.shape[1] - np.unique(k[k >= 0]).size for k in kept])
    received = received_count(out, kept)
    assert (received <= budget + orphans).all()
    if not reachable:
        empty = (kept < 0).reshape(rows, -1).sum(1)
        assert (received <= orphans + empty).all()


@settings(max_examples=100, deadline=None)
@given(
    st.integers(2, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16), st.floats(0, 1)
)
def test_group_trade_keeps_nodes_full_and_never_raises_the_heaviest_node(
    nodes: int, per_node: int, layers: int, seed: int, goal: float
) -> None:
    rng = np.random.default_rng(seed)
    groups = nodes * per_node
    home = np.stack([rng.permutation(np.repeat(np.arange(nodes), per_node)) for _ in range(layers)])
    group_load = rng.lognormal(0, 1, (layers, groups))
    out = _trade_groups(home, group_load, np.full(layers, goal), nodes)
    for layer in range(layers):
        assert np.bincount(out[layer], minlength=nodes).tolist() == [per_node] * nodes
        before = np.bincount(home[layer], weights=group_load[layer], minlength=nodes).max()
        after = np.bincount(out[layer], weights=group_load[layer], minlength=nodes).max()
        assert after <= before + 1e-9
        assert (out[layer] != home[layer]).sum() in (0, 2)
