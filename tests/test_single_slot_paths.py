"""The one-slot repair's paths (elastic_ep.eplb.single_slot) and the hierarchical one-slot repair:
which replicas stay, the slot-order fill, the 16-bit sort, group homes."""

from __future__ import annotations

import numpy as np
import pytest

from elastic_ep.eplb.hierarchical import _group_homes, repair_within_nodes
from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.single_slot import _by_row, repair_single_slot


def _reference(kept: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """bool [B, R]: the slots that keep their replica: per row, the first ``counts[e]``
    replicas of every expert in slot order."""
    rows, ranks, _ = kept.shape
    stays = np.zeros((rows, ranks), dtype=bool)
    for row in range(rows):
        seen: dict[int, int] = {}
        for rank in range(ranks):
            expert = int(kept[row, rank, 0])
            if expert >= 0:
                seen[expert] = seen.get(expert, 0) + 1
                stays[row, rank] = seen[expert] <= counts[row, expert]
    return stays


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("budget", [None, 0, 3])
def test_the_first_wanted_replicas_stay_and_the_rest_is_refilled(
    seed: int, budget: int | None
) -> None:
    rng = np.random.default_rng(seed)
    rows, ranks = 3, int(rng.integers(4, 30))
    experts = int(rng.integers(1, ranks + 1))
    kept = rng.integers(-1, experts, (rows, ranks, 1))
    load = rng.lognormal(0, 1, (rows, experts))
    counts = replica_counts(load, ranks, ranks)
    allowed = np.full(rows, ranks if budget is None else budget)
    out = repair_single_slot(kept, load, counts, allowed)
    stays = _reference(kept, counts)
    assert (out[..., 0][stays] == kept[..., 0][stays]).all()
    if budget is None:  # every other slot receives a missing replica
        assert (out[..., 0][~stays] != kept[..., 0][~stays]).all()
        assert (expert_counts(out, experts) == counts).all()
    assert np.array_equal(out, repair_single_slot(kept, load, counts, allowed))


def test_a_placement_with_the_wanted_counts_stays_as_it_is() -> None:
    rng = np.random.default_rng(0)
    load = rng.lognormal(0, 1, (4, 8))
    counts = replica_counts(load, 24, 24)
    kept = np.stack([rng.permutation(np.repeat(np.arange(8), c)) for c in counts])[..., None]
    out = repair_single_slot(kept, load, counts, np.full(4, 24))
    assert np.array_equal(out, kept)
    assert out is not kept


@pytest.mark.parametrize("rows", [5, 70_000])
def test_by_row_is_a_stable_sort_by_row(rows: int) -> None:
    rng = np.random.default_rng(1)
    row = rng.integers(0, rows, 2000)
    order = rng.permutation(2000)
    expected = order[np.lexsort((np.arange(2000), row[order]))]
    assert np.array_equal(_by_row(order, row, rows), expected)


def test_group_homes_take_the_node_with_most_replicas() -> None:
    # 2 nodes of 2 ranks, 2 groups of 2 experts (one slot per rank): group 0 mostly on node 1.
    kept = np.array([[[0], [2], [1], [0]], [[0], [1], [2], [3]]])
    group = np.where(kept[..., 0] >= 0, kept[..., 0] // 2 + np.array([[0], [2]]), 4)
    homes, usable = _group_homes(group, np.array([0, 0, 1, 1]), 2, 2)
    assert usable.all()
    assert homes.tolist() == [[1, 0], [0, 1]]


def test_one_slot_hierarchical_repair_keeps_groups_home() -> None:
    rng = np.random.default_rng(3)
    layers, ranks, experts, nodes = 6, 32, 16, 4
    load = rng.lognormal(0, 1, (layers, experts))
    # Node n holds group n's experts twice each, in a random order per layer; the groups of
    # nodes 0 and 1 traded places in layer 0.
    per_node = np.repeat(np.arange(experts).reshape(nodes, -1), 2, axis=1)
    kept = np.stack([rng.permuted(per_node, axis=1) for _ in range(layers)])
    kept[0, [0, 1]] = kept[0, [1, 0]]
    kept = kept.reshape(layers, ranks, 1)
    kept[:, 5] = -1  # a joined rank
    out, units, usable = repair_within_nodes(
        load, kept, np.zeros(layers), np.full(layers, ranks), nodes, nodes
    )
    assert units is None
    assert usable.all()
    # Each node receives the fewest weights its own replica counts allow.
    local_load = load.reshape(layers * nodes, -1)
    wanted = replica_counts(local_load, ranks // nodes, ranks // nodes)
    local_kept = (kept % (experts // nodes)).reshape(layers * nodes, ranks // nodes, 1)
    local_kept[kept.reshape(local_kept.shape) < 0] = -1
    have = expert_counts(local_kept, experts // nodes)
    fewest = np.maximum(wanted - have, 0).sum(1).reshape(layers, nodes).sum(1)
    assert ((out != kept).sum((1, 2)) == fewest).all()
    node_of = np.arange(ranks) // (ranks // nodes)
    for layer in range(layers):
        for node in range(nodes):
            held = out[layer, node_of == node, 0]
            assert (held >= 0).all()
            assert len(set((held // (experts // nodes)).tolist())) == 1
