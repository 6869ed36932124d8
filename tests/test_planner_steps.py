"""The planner's vectorised steps against plain reference implementations (hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb.hierarchical import groups_to_nodes
from elastic_ep.eplb.packing import improve_by_swaps, pack_rounds, sorted_replicas
from elastic_ep.eplb.replication import replica_counts


def _pairings(items: list[int]) -> list[list[tuple[int, int]]]:
    """Every way to split ``items`` (even length) into unordered pairs."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for i, partner in enumerate(rest):
        for tail in _pairings(rest[:i] + rest[i + 1 :]):
            out.append([(first, partner), *tail])
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_two_groups_per_node_is_the_best_pairing(
    nodes: int, layers: int, seed: int, integer: bool
) -> None:
    """With G = 2N groups, the direct pairing covers every group once and its heaviest node is
    the lowest any pairing reaches (checked by enumerating all pairings)."""
    rng = np.random.default_rng(seed)
    group_load = (
        rng.integers(0, 5, (layers, 2 * nodes))
        if integer
        else rng.lognormal(0, 1, (layers, 2 * nodes))
    )
    group_load = group_load.astype(np.float64)
    assigned = groups_to_nodes(group_load, nodes)
    assert assigned.shape == (layers, nodes, 2)
    for layer in range(layers):
        assert sorted(assigned[layer].ravel().tolist()) == list(range(2 * nodes))
        heaviest = group_load[layer][assigned[layer]].sum(1).max()
        best = min(
            max(group_load[layer, a] + group_load[layer, b] for a, b in pairing)
            for pairing in _pairings(list(range(2 * nodes)))
        )
        assert heaviest == best


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([4, 6, 8, 10]), st.integers(1, 3), st.integers(0, 2**16), st.booleans())
def test_two_nodes_take_the_best_split(groups: int, layers: int, seed: int, integer: bool) -> None:
    """With two nodes, each node gets G / 2 groups, every group once, and the heavier node is
    the lightest any split into halves reaches (checked by enumerating all splits)."""
    rng = np.random.default_rng(seed)
    group_load = (
        rng.integers(0, 5, (layers, groups)) if integer else rng.lognormal(0, 1, (layers, groups))
    ).astype(np.float64)
    assigned = groups_to_nodes(group_load, 2)
    assert assigned.shape == (layers, 2, groups // 2)
    for layer in range(layers):
        assert sorted(assigned[layer].ravel().tolist()) == list(range(groups))
        heaviest = group_load[layer][assigned[layer]].sum(1).max()
        total = group_load[layer].sum()
        best = min(
            max(part := group_load[layer, list(half)].sum(), total - part)
            for half in itertools.combinations(range(groups), groups // 2)
        )
        assert heaviest <= best * (1 + 1e-12)


def _best_pair_max(slots: np.ndarray, weight: np.ndarray, heavy: int) -> float:
    """Lowest larger load of (heavy rank, partner) over every allowed swap or move, by brute
    force; the heavy rank's load if none improves it."""
    loads = weight.sum(1)
    best = loads[heavy]
    for partner in range(slots.shape[0]):
        if partner == heavy:
            continue
        for i, j in itertools.product(range(slots.shape[1]), repeat=2):
            x, y = slots[heavy, i], slots[partner, j]
            if x >= 0 and x in slots[partner]:
                continue
            if y >= 0 and y in slots[heavy]:
                continue
            if x < 0 and y < 0:
                continue
            d = weight[heavy, i] - weight[partner, j]
            best = min(best, max(loads[heavy] - d, loads[partner] + d))
    return float(best)


@st.composite
def swap_rows(draw: st.DrawFn, max_ranks: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One row: slots int64 [R, S] (distinct experts per rank, some slots empty) and their
    loads float64 [R, S] (an expert's lognormal load, 0 for an empty slot)."""
    ranks = draw(st.integers(2, max_ranks))
    per_rank = draw(st.integers(1, 4))
    experts = draw(st.integers(1, ranks * per_rank))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    slots = np.full((ranks, per_rank), -1, dtype=np.int64)
    for rank in range(ranks):
        count = int(rng.integers(0, min(per_rank, experts) + 1))
        slots[rank, :count] = rng.choice(experts, count, replace=False)
    per_expert = rng.lognormal(0, 1, experts)
    weight = np.where(slots >= 0, per_expert[np.maximum(slots, 0)], 0.0)
    return slots, weight


@settings(max_examples=200, deadline=None)
@given(swap_rows())
def test_one_swap_step_matches_brute_force(row: tuple[np.ndarray, np.ndarray]) -> None:
    """One heaviest-vs-all step lowers the heaviest rank's pair exactly as far as the best
    swap found by brute force, and keeps every rank's experts distinct."""
    slots, weight = row
    loads = weight.sum(1)
    # Ranks within rounding of the maximum: any of them may be taken as the heaviest.
    tied = np.flatnonzero(np.isclose(loads, loads.max(), rtol=1e-12, atol=0))
    new_slots, new_weight = slots[None].copy(), weight[None].copy()
    improve_by_swaps(new_slots, new_weight, max_steps=1)
    new_loads = new_weight[0].sum(1)
    changed = np.flatnonzero(~np.isclose(new_loads, loads, rtol=0, atol=1e-12))
    if changed.size:
        assert changed.size == 2
        heavy = int(changed[np.isin(changed, tied)][0])
        expected = _best_pair_max(slots, weight, heavy)
        assert expected < loads[heavy] * (1 - 1e-12)
        assert np.isclose(new_loads[changed].max(), expected, rtol=1e-12)
    else:
        for rank_id in tied.tolist():
            assert _best_pair_max(slots, weight, rank_id) >= loads[rank_id] * (1 - 1e-12)
    for rank in new_slots[0]:
        held = rank[rank >= 0]
        assert len(set(held.tolist())) == held.size
    assert sorted(new_slots[0].ravel().tolist()) == sorted(slots.ravel().tolist())


def _pack_row(
    items: list[int], weight: list[float], ranks: int
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """Plain rounds for one row: each round's items, heaviest first, to the ranks by load
    (ignoring the float's last log2(R) bits, then by rank id); the round's replicas of an
    expert that ended the previous round go to the lightest ranks lacking it. The load a rank
    is sorted by drops those bits before each round's item is added (``keyed``); the rank
    loads returned are the exact sums."""
    low = (1 << max(1, (ranks - 1).bit_length())) - 1

    def truncated(value: float) -> int:
        return int(np.float64(value).view(np.int64)) & ~low

    slots: list[list[int]] = [[] for _ in range(ranks)]
    slot_weight: list[list[float]] = [[] for _ in range(ranks)]
    loads = [0.0] * ranks
    keyed = [0.0] * ranks
    for start in range(0, len(items), ranks):
        chunk = items[start : start + ranks]
        order = sorted(range(ranks), key=lambda r: (truncated(keyed[r]), r))
        expert = chunk[0]
        if start and expert >= 0 and items[start - 1] == expert:
            span = next((i for i, item in enumerate(chunk) if item != expert), ranks)
            chosen = [r for r in order if expert not in slots[r]][:span]
            order = chosen + [r for r in order if r not in chosen]
        for rank, item, load in zip(order, chunk, weight[start : start + ranks], strict=True):
            slots[rank].append(item)
            slot_weight[rank].append(load)
            loads[rank] += load
            keyed[rank] = float(np.int64(truncated(keyed[rank])).view(np.float64)) + load
    return slots, slot_weight, loads


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 5),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf"]),
)
def test_pack_rounds_matches_plain_rounds(
    rows: int, ranks: int, per_rank: int, seed: int, kind: str
) -> None:
    """The vectorised rounds give the plain per-row rounds' slots and rank loads exactly,
    including rows where an expert's replicas straddle two rounds."""
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(1, ranks * per_rank + 1))
    if kind == "lognormal":
        load = rng.lognormal(0, 1.5, (rows, experts))
    elif kind == "small integers":
        load = rng.integers(0, 4, (rows, experts)).astype(np.float64)
    else:
        load = np.stack([rng.permutation(1.0 / np.arange(1, experts + 1)) for _ in range(rows)])
    counts = replica_counts(load, ranks * per_rank, ranks)
    items, weight = sorted_replicas(counts, load / counts, ranks * per_rank)
    slots, slot_weight, rank_load = pack_rounds(items, weight, ranks)
    for row in range(rows):
        expected, expected_weight, loads = _pack_row(
            items[row].tolist(), weight[row].tolist(), ranks
        )
        assert slots[row].tolist() == expected
        assert slot_weight[row].tolist() == expected_weight
        assert rank_load[row].tolist() == loads


def _greedy_counts(load: np.ndarray, slots: int, max_replicas: int) -> np.ndarray:
    """One slot at a time to the expert of highest load per replica; ties at the lowest
    replica count, then the heavier expert, then the lower index."""
    out = np.ones(load.shape, dtype=np.int64)
    for row, weights in enumerate(load):
        weights = weights if weights.sum() > 0 else np.ones_like(weights)
        for _ in range(min(slots, load.shape[1] * max_replicas) - load.shape[1]):
            priority = weights / out[row]
            open_ = out[row] < max_replicas
            best = priority[open_].max()
            tied = np.flatnonzero(open_ & (priority == best))
            pick = min(tied, key=lambda e: (out[row, e], -weights[e], e))
            out[row, pick] += 1
    return out


def _count_load(kind: str, rng: np.random.Generator, rows: int, experts: int) -> np.ndarray:
    """float64 [rows, experts] of one of the replica-count tests' load kinds."""
    if kind == "lognormal":
        return rng.lognormal(0, 1.5, (rows, experts))
    if kind == "small integers":
        return rng.integers(0, 4, (rows, experts)).astype(np.float64)
    if kind == "zipf":
        profile = 1000.0 / np.arange(1, experts + 1) ** 1.1
        return np.stack([rng.permutation(profile) for _ in range(rows)])
    load = rng.lognormal(0, 1, (rows, experts))  # replica caps bind
    load[:, 0] *= 1e4
    return load


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 60),
    st.integers(1, 40),
    st.integers(1, 9),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf", "one heavy"]),
)
def test_replica_counts_are_the_per_slot_greedy(
    rows: int, experts: int, ranks: int, per_rank: int, seed: int, kind: str
) -> None:
    """The windowed selection (many extras per expert) and the plain bound (few) both give the
    per-slot greedy's counts, including exact ties and experts at their replica cap."""
    load = _count_load(kind, np.random.default_rng(seed), rows, min(experts, ranks * per_rank))
    counts = replica_counts(load, ranks * per_rank, ranks)
    assert (counts == _greedy_counts(load, ranks * per_rank, ranks)).all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 2),
    st.integers(49, 160),
    st.integers(2, 48),
    st.integers(2, 9),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf", "one heavy"]),
)
def test_replica_counts_of_many_experts_are_the_per_slot_greedy(
    rows: int, experts: int, ranks: int, per_rank: int, seed: int, kind: str
) -> None:
    """With more than 48 experts the window is first narrowed around an estimate of the cutoff
    (and widened again where that misses): still the per-slot greedy's counts."""
    load = _count_load(kind, np.random.default_rng(seed), rows, min(experts, ranks * per_rank))
    counts = replica_counts(load, ranks * per_rank, ranks)
    assert (counts == _greedy_counts(load, ranks * per_rank, ranks)).all()
