"""Quality of movement-aware plans on sweep-like cells (benchmarks/planner_sweep.py): the gain
they keep and the balancedness they reach, against the fresh plan at the new size."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping
from elastic_ep.eplb import plan
from elastic_ep.eplb.hierarchical import hierarchical_slots
from elastic_ep.eplb.packing import expert_counts, slot_loads, static_slots
from elastic_ep.eplb.planner import REPAIR_SWAP_STEPS
from elastic_ep.eplb.polish import greedy_pack, repack_stuck
from elastic_ep.eplb.repair_choice import RECOVERED, layer_targets


def zipf_load(layers: int, experts: int, seed: int = 0) -> np.ndarray:
    """float64 [L, E]: a permuted 1 / i^1.1 profile per layer (the sweep's loads)."""
    rng = np.random.default_rng(seed)
    profile = 1000.0 / np.arange(1, experts + 1) ** 1.1
    return np.stack([rng.permutation(profile) for _ in range(layers)])


def test_hierarchical_drift_keeps_the_models_gain() -> None:
    # 256 experts x 16 layers on 512 ranks x 2 slots, 8 nodes, 8 groups: node loads set each
    # layer's heaviest rank, every layer gains less than the tolerance, the model more; the
    # per-layer rule alone kept most layers as they were and lost 15% of the model's gain.
    _assert_drift_keeps_the_models_gain(16, 256, 512, 2, nodes=8)


def test_a_node_even_within_itself_counts_as_its_layers_heaviest() -> None:
    # 64 experts x 26 layers on 32 ranks x 5 slots, 4 nodes (a sweep cell): the heaviest node
    # is nearly even within itself, so shares measured from its own mean left it as it was; the
    # fresh plan looked 0.0016 worse than over the whole layer, the model's gain under the
    # tolerance, and the drift kept 0.79 of it (0.92 with the layer's mean).
    _assert_drift_keeps_the_models_gain(26, 64, 32, 5, nodes=4)


def test_a_near_miss_keeps_the_repair_over_a_costlier_fresh_plan() -> None:
    # 64 experts x 26 layers on 16 ranks x 9 slots, 2 nodes (a sweep cell): one layer's repair
    # misses its target by 0.00004 and took the relabelled fresh plan, 89 weights against 54,
    # as any miss under the tolerance did where the fresh plan moved under twice the repair's:
    # 564 weights in all, over 15% of the slots (529 with the miss weighed).
    _assert_drift_keeps_the_models_gain(26, 64, 16, 9, nodes=2)


def _assert_drift_keeps_the_models_gain(
    layers: int, experts: int, ranks: int, slots: int, nodes: int
) -> None:
    """A sweep-like drift (loads x lognormal(0, 0.1)) of a hierarchical plan with 8 groups, where
    the fresh plan gains over 0.01: the movement-aware plan keeps ``RECOVERED`` of that gain
    and moves at most 15% of the slots."""
    load = zipf_load(layers, experts)
    now = load * np.random.default_rng(1).lognormal(0.0, 0.1, load.shape)
    layout = dict(num_groups=8, num_nodes=nodes)
    previous = plan(load, ranks, slots, **layout)
    kept = previous.balancedness(now)
    fresh = plan(now, ranks, slots, **layout).balancedness(now)
    assert fresh - kept > 0.01
    drift = plan(now, ranks, slots, previous=previous, **layout)
    assert drift.balancedness(now) - kept >= RECOVERED * (fresh - kept)
    assert int(drift.transfers_from(previous).sum()) <= 0.15 * drift.num_slots * layers


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=12),
    st.sampled_from([0.0, 0.001, 0.01, 0.05]),
)
def test_layer_targets_keep_the_models_gain(pairs: list, tolerance: float) -> None:
    fresh, kept = (np.array(column) for column in zip(*pairs, strict=True))
    target = layer_targets(fresh, kept, tolerance)
    assert (target <= fresh).all() and (target >= fresh - tolerance - 1e-12).all()
    gain = fresh - kept
    # Every layer reaching its target (or kept as it is where that is above it) keeps
    # RECOVERED of each layer's gain over the tolerance, and of the model's over it.
    big = gain > tolerance
    assert (target[big] >= kept[big] + RECOVERED * gain[big] - 1e-12).all()
    if gain.mean() > tolerance:
        reached = np.maximum(target, kept) - kept
        assert reached.mean() >= RECOVERED * gain.mean() - 1e-12


def test_scale_down_reaches_the_greedy_packing() -> None:
    # 256 experts x 8 layers on 64 -> 56 ranks x 5 slots: the rounds leave the ranks of the
    # hottest replicas with middling items and their swaps get stuck at 0.835; the plan aimed
    # at that, 0.02 under the greedy packing of the same replicas (vLLM's 0.856).
    load = zipf_load(8, 256)
    previous = plan(load, 64, 5)
    mapping = RankMapping.resize(64, 56)
    scaled = plan(load, 56, 5, previous=previous, rank_mapping=mapping)
    fresh = static_slots(load, 56, 5, REPAIR_SWAP_STEPS)
    weight = slot_loads(fresh, load / expert_counts(fresh, 256))
    _, rank_load, complete = greedy_pack(fresh, weight)
    assert complete.all()
    greedy = float((rank_load.mean(1) / rank_load.max(1)).mean())
    assert scaled.balancedness(load) >= greedy - 0.01


@st.composite
def packings(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """(slots [L, R, S], load [L, E], nodes): a fresh plan of a random load, S >= 3."""
    nodes = draw(st.sampled_from([1, 2]))
    per_rank = draw(st.integers(3, 5))
    per_node = draw(st.integers(2, 10))
    ranks = nodes * per_node
    # Few replicas over one per expert: a hot expert's replica then stays near the mean load.
    experts = nodes * draw(st.integers(max(1, per_node * (per_rank - 1)), per_node * per_rank))
    layers = draw(st.integers(1, 3))
    exponent = draw(st.sampled_from([0.0, 0.8, 1.1, 1.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    load = np.stack(
        [rng.permutation(1.0 / np.arange(1, experts + 1) ** exponent) for _ in range(layers)]
    )
    slots = (
        static_slots(load, ranks, per_rank, 2)
        if nodes == 1
        else hierarchical_slots(load, nodes, nodes, ranks, per_rank, 2)
    )
    return slots, load, nodes


@settings(max_examples=150, deadline=None)
@given(packings())
def test_repack_keeps_replicas_nodes_and_never_raises_the_heaviest_rank(case: tuple) -> None:
    slots, load, nodes = case
    layers, ranks, per_rank = slots.shape
    experts = load.shape[1]
    before = slots.copy()
    improved = repack_stuck(slots, load, nodes)
    assert (expert_counts(slots, experts) == expert_counts(before, experts)).all()
    for row in slots.reshape(-1, per_rank):
        held = row[row >= 0]
        assert len(set(held.tolist())) == held.size
    node_of = np.arange(ranks) // (ranks // nodes)
    for layer in range(layers):
        homes = {(e, node_of[r]) for r in range(ranks) for e in before[layer, r] if e >= 0}
        assert {(e, node_of[r]) for r in range(ranks) for e in slots[layer, r] if e >= 0} == homes
    counts = np.maximum(expert_counts(before, experts), 1)
    new_peak, old_peak = (
        slot_loads(s, load / counts).sum(2).reshape(layers, nodes, -1).max(2)
        for s in (slots, before)
    )
    assert (new_peak <= old_peak + 1e-9).all()  # no node's heaviest rank rises
    assert (improved == (slots != before).reshape(layers, -1).any(1)).all()
    assert (improved <= (new_peak < old_peak).any(1)).all()


@settings(max_examples=100, deadline=None)
@given(packings())
def test_greedy_pack_keeps_every_replica_once_per_rank(case: tuple) -> None:
    slots, load, _ = case
    experts, per_rank = load.shape[1], slots.shape[2]
    weight = slot_loads(slots, load / np.maximum(expert_counts(slots, experts), 1))
    packed, rank_load, complete = greedy_pack(slots, weight)
    assert complete.all()  # heaviest first, a replica always finds a rank lacking its expert
    assert (expert_counts(packed, experts) == expert_counts(slots, experts)).all()
    for row in packed.reshape(-1, per_rank):
        held = row[row >= 0]
        assert len(set(held.tolist())) == held.size
    counts = np.maximum(expert_counts(slots, experts), 1)
    assert np.allclose(slot_loads(packed, load / counts).sum(2), rank_load)


def _greedy_row(slots: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """One row of :func:`greedy_pack` written item by item: replicas heaviest first (ties by
    expert, then slot), each to the lightest rank (ties: the lowest) with room that lacks it."""
    ranks, per_rank = slots.shape
    pairs = zip(slots.ravel(), weight.ravel(), strict=True)
    items = [(-w, e, i) for i, (e, w) in enumerate(pairs) if e >= 0]
    out = np.full((ranks, per_rank), -1, dtype=np.int64)
    rank_load, held = np.zeros(ranks), [[] for _ in range(ranks)]
    for negative, expert, _ in sorted(items):
        open_ranks = [r for r in range(ranks) if len(held[r]) < per_rank and expert not in held[r]]
        if not open_ranks:
            return out, rank_load, False
        rank = min(open_ranks, key=lambda r: (rank_load[r], r))
        out[rank, len(held[rank])] = expert
        held[rank].append(expert)
        rank_load[rank] -= negative
    return out, rank_load, True


@settings(max_examples=150, deadline=None)
@given(packings())
def test_greedy_pack_is_the_greedy_written_item_by_item(case: tuple) -> None:
    slots, load, _ = case
    experts = load.shape[1]
    weight = slot_loads(slots, load / np.maximum(expert_counts(slots, experts), 1))
    packed, rank_load, complete = greedy_pack(slots, weight)
    for row in range(slots.shape[0]):
        want, want_load, want_complete = _greedy_row(slots[row], weight[row])
        assert complete[row] == want_complete
        if want_complete:
            assert np.array_equal(packed[row], want)
            assert np.allclose(rank_load[row], want_load, rtol=0, atol=1e-12)
