"""The rank order of fresh plans (eplb/rank_order.py): ranks move whole within their node, every
expert keeps a replica below the ranks that hold only spare ones, and a scale-down that drops the
highest ranks of a fresh plan loses no expert where spare ranks exist."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping
from elastic_ep.eplb import plan, plan_with_report, planner
from elastic_ep.eplb.hierarchical import hierarchical_slots
from elastic_ep.eplb.packing import static_slots
from elastic_ep.eplb.rank_order import (
    _sort_rows,
    essential_first,
    essential_items,
    essential_one_slot,
)
from elastic_ep.eplb.replication import replica_counts


@st.composite
def node_plans(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """(slots int64 [L, R, S], load float64 [L, E], nodes): every expert of a node only in that
    node, no expert twice on a rank, some empty slots, some zero loads."""
    layers = draw(st.integers(1, 3))
    nodes = draw(st.integers(1, 3))
    per_node = draw(st.integers(1, 6))
    per_rank = draw(st.integers(1, 4))
    experts_per_node = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    experts = nodes * experts_per_node
    slots = np.full((layers, nodes * per_node, per_rank), -1, dtype=np.int64)
    for layer in range(layers):
        for node in range(nodes):
            own = np.arange(node * experts_per_node, (node + 1) * experts_per_node)
            for rank in range(node * per_node, (node + 1) * per_node):
                held = rng.permutation(own)[: rng.integers(0, min(per_rank, own.size) + 1)]
                slots[layer, rank, : held.size] = held
    load = rng.random((layers, experts)) * (rng.random((layers, experts)) > 0.2)
    return slots, load, nodes


def node_rows(slots: np.ndarray, nodes: int) -> np.ndarray:
    """int64 [L * N, R / N, S]: the (layer, node) rows of ``slots`` int64 [L, R, S]."""
    layers, ranks, per_rank = slots.shape
    return slots.reshape(layers * nodes, ranks // nodes, per_rank)


def as_packed(slots: np.ndarray, *_: object, **__: object) -> np.ndarray:
    """Stands in for ``planner.essential_first``: the fresh plan's ranks as packed."""
    return slots


def orphans_after_dropping(slots: np.ndarray, nodes: int, drop: int) -> int:
    """Experts of each (layer, node) present in ``slots`` with no replica on its first
    R / N - ``drop`` ranks, summed."""
    lost = 0
    for row in node_rows(slots, nodes):
        held = set(row.ravel().tolist()) - {-1}
        lost += len(held - set(row[: row.shape[0] - drop].ravel().tolist()))
    return lost


@settings(max_examples=200, deadline=None)
@given(node_plans())
def test_ranks_move_whole_within_their_node(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    slots, load, nodes = case
    out = essential_first(slots, load, nodes)
    for before, after in zip(node_rows(slots, nodes), node_rows(out, nodes), strict=True):
        assert sorted(map(tuple, before.tolist())) == sorted(map(tuple, after.tolist()))


@settings(max_examples=200, deadline=None)
@given(node_plans())
def test_spare_ranks_come_last(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    """Dropping the top k ranks of a node loses no expert while k is at most the node's ranks
    less those that must hold a home: each rank holding a single-replica expert, and one rank
    for each other expert with no replica on such a rank."""
    slots, load, nodes = case
    for row in node_rows(essential_first(slots, load, nodes), nodes):
        experts, counts = np.unique(row[row >= 0], return_counts=True)
        single = set(experts[counts == 1].tolist())
        homes = [r for r in range(row.shape[0]) if single & set(row[r].tolist())]
        covered = {e for r in homes for e in row[r].tolist()} - {-1}
        needed = len(homes) + len(set(experts.tolist()) - covered)
        for drop in range(max(row.shape[0] - needed, 0) + 1):
            assert orphans_after_dropping(row[None], 1, drop) == 0, (drop, row)


def reference_order(row: np.ndarray, load: np.ndarray) -> np.ndarray:
    """int64 [R, S]: ``row``'s ranks by the module docstring's rule, one rank and one expert at
    a time: an expert's replicas in rank order, those on a rank holding a single-replica
    expert first; the first is a home (+inf), the j-th after it worth ``load / j``; a rank is
    worth its best replica (an empty rank last), descending, ties in rank order, worths equal
    in their top 16 float32 bits tied."""
    experts, counts = np.unique(row[row >= 0], return_counts=True)
    single = set(experts[counts == 1].tolist())
    holds_single = [bool(single & set(rank.tolist())) for rank in row]
    worth = [-1.0] * row.shape[0]
    for expert in experts.tolist():
        ranks = sorted(
            (r for r in range(row.shape[0]) if expert in row[r]),
            key=lambda r: (not holds_single[r], r),
        )
        for nth, rank in enumerate(ranks):
            weight = np.float32(load[expert]) + np.float32(1e-30)
            replica = np.inf if nth == 0 else weight * np.float32(1.0 / nth)
            worth[rank] = max(worth[rank], float(replica))
    bits = np.array(worth, dtype=np.float32).view(np.uint32) >> 16
    key = [(1, 0) if w < 0 else (0, -int(b)) for w, b in zip(worth, bits, strict=True)]
    return row[sorted(range(row.shape[0]), key=lambda r: key[r])]


@settings(max_examples=200, deadline=None)
@given(node_plans())
def test_ranks_follow_the_rule_computed_rank_by_rank(
    case: tuple[np.ndarray, np.ndarray, int],
) -> None:
    slots, load, nodes = case
    out = essential_first(slots, load, nodes)
    for index, (row, got) in enumerate(
        zip(node_rows(slots, nodes), node_rows(out, nodes), strict=True)
    ):
        want = reference_order(row, load[index // nodes])
        assert np.array_equal(got, want), (row, got, want)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3),
    st.sampled_from([(1, 1), (2, 2), (2, 4), (4, 4)]),
    st.integers(1, 4),
    st.integers(0, 8),
    st.integers(0, 2**16),
)
def test_one_slot_plans_are_packed_in_the_essential_order(
    layers: int, layout: tuple[int, int], group_size: int, spare: int, seed: int
) -> None:
    """A one-slot fresh plan built in order (``essential_one_slot``, global and per node) is
    the packed plan sorted by :func:`essential_first`, bit for bit: ties (integer loads), zero
    loads, one replica per expert (no spare) and many spares. It fails where a spare is worth
    load / (j + 1)."""
    nodes, groups = layout
    rng = np.random.default_rng(seed)
    experts = groups * group_size
    ranks = nodes * (experts // nodes + spare)
    load = rng.integers(0, 4, (layers, experts)).astype(np.float64)
    load[:, rng.random(experts) < 0.5] *= rng.random() * 100
    if nodes == 1:
        built = essential_one_slot(load, ranks)
    else:
        built = hierarchical_slots(load, groups, nodes, ranks, 1, 0, essential=True)
    packed = packed_one_slot(load, ranks, groups, nodes)
    assert np.array_equal(built, essential_first(packed, load, nodes))


def packed_one_slot(load: np.ndarray, ranks: int, groups: int, nodes: int) -> np.ndarray:
    """int64 [L, R, 1]: the one-slot fresh plan as packed, before any rank order."""
    if nodes == 1:
        return static_slots(load, ranks, 1, 0)
    return hierarchical_slots(load, groups, nodes, ranks, 1, 0)


def test_one_slot_plans_write_ids_past_16_bits() -> None:
    """``ids`` (a node's experts by global id) past 2^16 take 64-bit entries: the same plan,
    written with those ids."""
    load = np.array([[5.0, 1.0, 3.0, 0.0], [1.0, 1.0, 9.0, 2.0]])
    counts = replica_counts(load, 9, 9)
    ids = np.array([[70_000, 70_001, 70_002, 70_003], [90_000, 5, 90_002, 90_003]])
    plain = essential_items(counts, load / counts, load, 9)
    named = essential_items(counts, load / counts, load, 9, ids)
    assert np.array_equal(named, np.take_along_axis(ids, plain, axis=1))


def test_the_jth_spare_replica_is_worth_its_load_over_j() -> None:
    """Expert 0 (load 10) on three ranks, expert 1 (load 6) on two: homes first, then 0's first
    spare (10), 1's (6), 0's second (5). Worth load / (j + 1) would put 0's spares first."""
    slots = np.array([[[0], [0], [0], [1], [1]]])
    load = np.array([[10.0, 6.0]])
    assert essential_first(slots, load)[0, :, 0].tolist() == [0, 1, 0, 1, 0]
    assert reference_order(slots[0], load[0])[:, 0].tolist() == [0, 1, 0, 1, 0]


def test_a_fresh_plan_loses_no_expert_when_its_top_eighth_leaves() -> None:
    """64 experts on 512 one-slot ranks (and 8 nodes): packed as dealt, dropping the top 64
    ranks left a third of every layer's experts with no replica."""
    rng = np.random.default_rng(0)
    profile = 1000.0 / np.arange(1, 65) ** 1.1
    load = np.stack([rng.permutation(profile) for _ in range(4)])
    for nodes, groups in ((1, 1), (8, 8)):
        placement = plan(load, 512, 1, num_groups=groups, num_nodes=nodes)
        slots = placement.phy2log.numpy().reshape(4, 512, 1)
        assert orphans_after_dropping(slots, nodes, 512 // nodes // 8) == 0
    # The scale-down itself then re-homes nothing: every expert keeps a replica.
    placement = plan(load, 512, 1)
    report = plan_with_report(
        load, 448, 1, previous=placement, rank_mapping=RankMapping.resize(512, 448)
    )
    assert not bool(report.lost.any())
    kept = placement.phy2log.reshape(4, 512)[:, :448]
    present = [set(row.tolist()) for row in kept]
    assert all(len(p) == 64 for p in present)


def test_a_global_multi_slot_plan_loses_fewer_experts_when_its_top_eighth_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Global plans of several slots per rank are ordered too (hierarchical ones are not:
    ``planner.ORDER_MOST_SLOTS``): 128 experts on 128 x 3 slots, packed as dealt, lose the hot
    experts whose replicas the packing put on neighbouring top ranks; ordered, none, and the
    scale-down receives fewer weights."""
    rng = np.random.default_rng(0)
    profile = 1000.0 / np.arange(1, 129) ** 1.1
    load = np.stack([rng.permutation(profile) for _ in range(4)])
    ordered = plan(load, 128, 3)
    with monkeypatch.context() as patch:
        patch.setattr(planner, "essential_first", as_packed)
        packed = plan(load, 128, 3)
    lost = [
        orphans_after_dropping(p.phy2log.numpy().reshape(4, 128, 3), 1, 16)
        for p in (ordered, packed)
    ]
    assert lost[0] == 0 < lost[1]
    received = [
        int(
            plan_with_report(
                load, 112, 3, previous=p, rank_mapping=RankMapping.resize(128, 112)
            ).transfers.sum()
        )
        for p in (ordered, packed)
    ]
    assert received[0] < received[1]
    hierarchical = plan(load, 128, 3, num_groups=8, num_nodes=8).phy2log.numpy()
    with monkeypatch.context() as patch:
        patch.setattr(planner, "essential_first", as_packed)
        unordered = plan(load, 128, 3, num_groups=8, num_nodes=8).phy2log.numpy()
    assert np.array_equal(hierarchical, unordered)


def test_every_rank_holding_a_single_keeps_the_order() -> None:
    """No rank holds only spare replicas: no order spares an expert, the plan is unchanged."""
    slots = np.array([[[0, 1], [2, 3], [4, 0]]])
    load = np.ones((1, 5))
    assert np.array_equal(essential_first(slots, load), slots)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 80), st.integers(1, 300), st.integers(0, 2**16))
def test_sort_rows_is_a_stable_sort_of_each_row(rows: int, width: int, seed: int) -> None:
    """Both ways of :func:`_sort_rows` (two flat radix passes for many short rows, else one
    sort per row) give each row's stable order, as flat indices."""
    key = np.random.default_rng(seed).integers(0, 8, (rows, width)).astype(np.uint16)
    want = (np.argsort(key, axis=1, kind="stable") + np.arange(rows)[:, None] * width).ravel()
    assert np.array_equal(_sort_rows(key), want)


def test_more_experts_than_16_bit_keys_hold() -> None:
    """Expert ids past 2^15 take 64-bit keys: the order is the same as with small ids."""
    slots = np.array([[[3], [3], [0], [3], [1]]])
    load = np.array([[1.0, 2.0, 0.0, 9.0]])
    small = essential_first(slots, load)
    shift = 40_000
    big_load = np.zeros((1, shift + 4))
    big_load[0, shift:] = load[0]
    big = essential_first(np.where(slots >= 0, slots + shift, -1), big_load)
    assert np.array_equal(np.where(big >= 0, big - shift, -1), small)
    # Homes first in rank order (3's on rank 0, 0, 1), then 3's spares, worth 9 / 1 and 9 / 2.
    assert small[0, :, 0].tolist() == [3, 0, 1, 3, 3]


def test_the_planner_orders_one_slot_fresh_plans_as_the_general_path_does() -> None:
    """The planner builds one-slot fresh plans in order (``essential_one_slot``, per node for
    hierarchical ones): the same placement as the packed plan sorted by
    :func:`essential_first`."""
    rng = np.random.default_rng(1)
    load = rng.lognormal(0.0, 1.0, (5, 32))
    for ranks, nodes, groups in ((64, 1, 1), (64, 4, 8), (96, 2, 4)):
        ordered = plan(load, ranks, 1, num_groups=groups, num_nodes=nodes).phy2log.numpy()
        packed = packed_one_slot(load, ranks, groups, nodes)
        expected = essential_first(packed, load, nodes)
        assert np.array_equal(ordered, expected.reshape(5, ranks))
        assert not np.array_equal(ordered, packed.reshape(5, ranks))
