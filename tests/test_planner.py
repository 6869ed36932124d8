"""Fresh plans: invariants (hypothesis), quality floors, errors, DeepSeek compatibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import Placement, plan, rebalance_experts

LOAD_KINDS = ("lognormal", "zipf", "sparse", "zero")


def make_load(kind: str, layers: int, experts: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        return rng.lognormal(0.0, 0.6, (layers, experts))
    if kind == "zipf":
        zipf = 1.0 / np.arange(1, experts + 1)
        return np.stack([rng.permutation(zipf) for _ in range(layers)]) * 1000
    if kind == "sparse":  # many idle experts, integer token counts
        return rng.integers(0, 4, (layers, experts)) * rng.integers(0, 50, (layers, experts))
    return np.zeros((layers, experts))


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    experts = draw(st.integers(1, 24))
    ranks = draw(st.integers(1, 8))
    min_slots = -(-experts // ranks)
    slots = draw(st.integers(min_slots, min_slots + 3))
    load = make_load(
        draw(st.sampled_from(LOAD_KINDS)),
        draw(st.integers(1, 3)),
        experts,
        draw(st.integers(0, 2**16)),
    )
    return load, ranks, slots


def check_consistent(
    placement: Placement, ranks: int, slots: int, ranks_per_node: int | None = None
) -> None:
    """Invariants every plan must satisfy (replicas of an expert stay inside its node)."""
    layers, experts = placement.num_layers, placement.num_logical
    assert placement.phy2log.shape == (layers, ranks * slots)
    # The planner skips the public constructor's checks (valid by construction): they pass.
    assert placement.phy2log.is_contiguous()
    Placement(placement.phy2log, experts, placement.num_ranks)
    placement.validate(distinct_ranks=True)  # every expert placed, no rank holds one twice
    nonempty = (placement.phy2log >= 0).sum(1)
    assert torch.equal(placement.replicas.sum(1), nonempty)
    cap = ranks if ranks_per_node is None else ranks_per_node
    assert bool((nonempty == min(ranks * slots, experts * cap)).all())
    # Routing shares: the public constructor accepts them (units >= 1 on occupied slots, 0 on
    # empty ones, every expert within max_units).
    Placement(placement.phy2log, experts, placement.num_ranks, units=placement.units)
    assert int(placement.logcnt.max()) <= max(placement.max_units, int(placement.replicas.max()))
    log2phy = placement.log2phy
    for layer in range(layers):
        for expert in range(experts):
            count = int(placement.logcnt[layer, expert])
            slots_of = log2phy[layer, expert]
            assert bool((slots_of[count:] == -1).all())
            assert bool((placement.phy2log[layer, slots_of[:count]] == expert).all())


def rank_excess_bound(placement: Placement, load: np.ndarray) -> np.ndarray:
    """Per layer, balancedness can't fall below mean / (mean + heaviest replica): the rounds
    deal replicas heaviest-to-lightest-rank, which keeps the spread of rank loads within one
    replica, and swaps only lower the heaviest rank."""
    weights = torch.from_numpy(np.where(load.sum(1, keepdims=True) > 0, load, 0.0))
    per_replica = weights / placement.replicas.clamp(min=1)
    mean = placement.rank_loads(weights).mean(1)
    return torch.where(mean > 0, mean / (mean + per_replica.max(1).values), 1.0).numpy()


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(0, 12))
def test_fresh_plan_invariants(problem: tuple[np.ndarray, int, int], swap_steps: int) -> None:
    load, ranks, slots = problem
    placement = plan(load, ranks, slots, swap_steps=swap_steps)
    check_consistent(placement, ranks, slots)
    rank_loads = placement.rank_loads(torch.from_numpy(load))
    peak = rank_loads.max(1).values
    balance = torch.where(peak > 0, rank_loads.mean(1) / peak.clamp(min=1e-300), 1.0).numpy()
    assert bool((balance >= rank_excess_bound(placement, load) - 1e-9).all())
    assert plan(load, ranks, slots, swap_steps=swap_steps) == placement  # deterministic
    assert plan(torch.from_numpy(load), ranks, slots, swap_steps=swap_steps) == placement


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),  # groups per node
    st.integers(1, 4),  # nodes
    st.integers(1, 4),  # experts per group
    st.integers(1, 3),  # ranks per node
    st.integers(0, 3),  # extra slots
    st.sampled_from(LOAD_KINDS),
    st.integers(0, 2**16),
)
def test_hierarchical_keeps_groups_in_a_node(
    groups_per_node: int,
    nodes: int,
    group_size: int,
    ranks_per_node: int,
    extra: int,
    kind: str,
    seed: int,
) -> None:
    groups = groups_per_node * nodes
    experts = groups * group_size
    ranks = ranks_per_node * nodes
    slots = -(-(experts // nodes) // ranks_per_node) + extra
    load = make_load(kind, 2, experts, seed)
    placement = plan(load, ranks, slots, num_groups=groups, num_nodes=nodes)
    check_consistent(placement, ranks, slots, ranks_per_node)
    node_of_slot = placement.rank_of_slot // ranks_per_node
    for layer in range(placement.num_layers):
        for group in range(groups):
            members = (placement.phy2log[layer] // group_size == group) & (
                placement.phy2log[layer] >= 0
            )
            assert node_of_slot[members].unique().numel() == 1, f"group {group} spans nodes"


# Balancedness of DeepSeek's / vLLM's default policy on these shapes (shared/ANCHORS.md); the
# benchmark compares with vLLM side by side on the same loads.
ANCHOR_FLOORS = [
    ("V3-320 global lognormal", 256, 32, 10, 1, 1, "lognormal", 0.992),
    ("V3-320 global zipf", 256, 32, 10, 1, 1, "zipf", 0.99),
    ("V3-288 hierarchical lognormal", 256, 32, 9, 8, 4, "lognormal", 0.966),
    ("V3-288 hierarchical zipf", 256, 32, 9, 8, 4, "zipf", 0.711),
    ("V2-Lite-80 lognormal", 64, 8, 10, 1, 1, "lognormal", 0.993),
]


@pytest.mark.parametrize(
    ("name", "experts", "ranks", "slots", "groups", "nodes", "kind", "floor"), ANCHOR_FLOORS
)
def test_quality_at_least_the_anchors(
    name: str,
    experts: int,
    ranks: int,
    slots: int,
    groups: int,
    nodes: int,
    kind: str,
    floor: float,
) -> None:
    load = make_load(kind, 58, experts, seed=7)
    placement = plan(load, ranks, slots, num_groups=groups, num_nodes=nodes)
    placement.validate(distinct_ranks=True)
    assert placement.balancedness(torch.from_numpy(load)) >= floor, name


# DeepSeek EPLB README example: 2 layers, 12 experts, 4 groups, 2 nodes, 8 GPUs, 16 replicas.
README_WEIGHT = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
README_PHY2LOG = torch.tensor(  # DeepSeek's published output
    [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
)


def test_rebalance_experts_golden_readme_example() -> None:
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (2, 16) and logcnt.shape == (2, 12)
    assert log2phy.shape == (2, 12, 16 - 12 + 1)  # DeepSeek pads to num_redundant + 1
    ours = Placement(phy2log, 12, 8)
    ours.validate(distinct_ranks=True)
    assert torch.equal(ours.logcnt, logcnt)
    assert torch.equal(ours.log2phy, log2phy[:, :, : ours.log2phy.shape[2]])
    deepseek = Placement(README_PHY2LOG, 12, 8)
    assert ours.balancedness(README_WEIGHT) >= deepseek.balancedness(README_WEIGHT) - 1e-12
    # hierarchical: node 0 (slots 0-7) and node 1 hold whole groups of 3 experts
    for layer in range(2):
        for node in range(2):
            groups = set((phy2log[layer, node * 8 : (node + 1) * 8] // 3).tolist())
            assert len(groups) == 2


def test_rebalance_experts_global_when_groups_do_not_split_over_nodes() -> None:
    weight = torch.rand(3, 12)
    phy2log, _, logcnt = rebalance_experts(weight, 18, 3, 2, 6)
    Placement(phy2log, 12, 6).validate(distinct_ranks=True)
    assert int(logcnt.sum()) == 3 * 18


BAD_INPUTS = [
    (
        dict(load=np.ones((2, 10)), num_ranks=3, slots_per_rank=3),
        ValueError,
        "cannot hold 10 experts",
    ),
    (
        dict(load=np.ones((2, 8)), num_ranks=4, slots_per_rank=2, num_groups=2, num_nodes=4),
        ValueError,
        "not a multiple of num_nodes",
    ),
    (
        dict(load=np.ones((2, 8)), num_ranks=4, slots_per_rank=2, num_groups=3),
        ValueError,
        "equal groups",
    ),
    (
        dict(load=np.ones((2, 8)), num_ranks=3, slots_per_rank=4, num_groups=2, num_nodes=2),
        ValueError,
        "num_ranks=3",
    ),
    (dict(load=np.array([[1.0, np.nan]]), num_ranks=2, slots_per_rank=1), ValueError, "not finite"),
    (dict(load=np.array([[1.0, np.inf]]), num_ranks=2, slots_per_rank=1), ValueError, "not finite"),
    (dict(load=np.array([[1.0, -2.0]]), num_ranks=2, slots_per_rank=1), ValueError, "negative"),
    (dict(load=np.ones(4), num_ranks=2, slots_per_rank=2), ValueError, "shape"),
    (dict(load=np.ones((2, 0)), num_ranks=2, slots_per_rank=2), ValueError, "shape"),
    (
        dict(load=np.ones((2, 4), dtype=bool), num_ranks=2, slots_per_rank=2),
        TypeError,
        "real numbers",
    ),
    (
        dict(load=torch.ones(2, 4, dtype=torch.complex64), num_ranks=2, slots_per_rank=2),
        TypeError,
        "real numbers",
    ),
    (dict(load=[[1.0, 2.0]], num_ranks=2, slots_per_rank=1), TypeError, "torch.Tensor or numpy"),
    (
        dict(load=np.ones((2, 4)), num_ranks=2.0, slots_per_rank=2),
        TypeError,
        "num_ranks must be an int",
    ),
    (
        dict(load=np.ones((2, 4)), num_ranks=0, slots_per_rank=2),
        ValueError,
        "num_ranks must be >= 1",
    ),
    (
        dict(load=np.ones((2, 4)), num_ranks=2, slots_per_rank=2, max_transfers=3),
        ValueError,
        "need a previous",
    ),
    (
        dict(load=np.ones((2, 4)), num_ranks=2, slots_per_rank=2, balance_tolerance=2.0),
        ValueError,
        "balance_tolerance",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_INPUTS)
def test_bad_input_names_the_problem(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        plan(**kwargs)


def test_v3_288_cannot_shrink_to_28_ranks() -> None:
    load = make_load("lognormal", 4, 256, seed=0)
    with pytest.raises(ValueError, match="28 ranks x 9 slots = 252 slots cannot hold 256 experts"):
        plan(load, 28, 9)


def test_more_slots_than_replicas_can_use_stay_empty() -> None:
    load = make_load("lognormal", 2, 3, seed=1)
    placement = plan(load, 2, 5)  # 10 slots, but 3 experts x 2 ranks = 6 distinct replicas
    placement.validate(distinct_ranks=True)
    assert int((placement.phy2log == -1).sum()) == 2 * 4


def test_swap_steps_default_by_layout() -> None:
    # Hierarchical plans take HIERARCHICAL_SWAP_STEPS unless told otherwise, global ones
    # DEFAULT_SWAP_STEPS; an explicit swap_steps wins either way.
    from elastic_ep.eplb import planner

    rng = np.random.default_rng(0)
    load = rng.random((6, 64)) ** 4
    hier = dict(num_groups=8, num_nodes=2)
    steps = planner.HIERARCHICAL_SWAP_STEPS
    assert torch.equal(
        plan(load, 16, 9, **hier).phy2log, plan(load, 16, 9, **hier, swap_steps=steps).phy2log
    )
    assert torch.equal(
        plan(load, 16, 9).phy2log, plan(load, 16, 9, swap_steps=planner.DEFAULT_SWAP_STEPS).phy2log
    )
    assert not torch.equal(
        plan(load, 16, 9, **hier).phy2log, plan(load, 16, 9, **hier, swap_steps=8).phy2log
    )
