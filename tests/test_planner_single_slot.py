"""The one-slot-per-rank repair (elastic_ep.eplb.single_slot): properties on random layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping
from elastic_ep.eplb import plan, plan_with_report, planner, repair_choice
from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.repair_swaps import received_count
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.single_slot import repair_single_slot
from elastic_ep.eplb.unit_balance import equal_split_balance


def _layout(rng: np.random.Generator, rows: int, ranks: int, experts: int) -> np.ndarray:
    """int64 [B, R, 1]: random experts on random ranks, some ranks empty."""
    kept = rng.integers(-1, experts, (rows, ranks, 1))
    return kept.astype(np.int64)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 40),
    st.integers(1, 40),
    st.one_of(st.none(), st.integers(0, 10)),
    st.integers(0, 2**16),
)
def test_repair_keeps_what_the_counts_allow_and_fills_the_rest(
    rows: int, ranks: int, experts: int, budget: int | None, seed: int
) -> None:
    experts = min(experts, ranks)
    rng = np.random.default_rng(seed)
    kept = _layout(rng, rows, ranks, experts)
    load = rng.lognormal(0, 1, (rows, experts))
    counts = replica_counts(load, ranks, ranks)
    have = expert_counts(kept, experts)
    orphans = (have == 0).sum(1)
    allowed = np.full(rows, ranks if budget is None else budget)
    out = repair_single_slot(kept, load, counts, allowed)
    assert out.shape == kept.shape
    assert ((out >= -1) & (out < experts)).all()
    got = expert_counts(out, experts)
    assert (got >= 1).all()  # every expert placed, whatever the budget
    # Surviving replicas stay in place up to the wanted count of their expert.
    stayed = (out == kept) & (kept >= 0)
    for row in range(rows):
        kept_here = np.bincount(kept[row][stayed[row]], minlength=experts)
        assert (kept_here >= np.minimum(have[row], counts[row])).all()
    received = received_count(out, kept)
    deficit = np.maximum(counts - have, 0).sum(1)
    if budget is None:
        # Exactly the wanted counts, received with the fewest transfers those counts allow.
        assert (got == counts).all()
        assert (received == deficit).all()
    else:
        assert (received <= orphans + budget).all()
        assert (received == np.minimum(deficit, orphans + budget)).all()


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from(["drift", "up", "down", "dead"]),
    st.sampled_from([1, 4]),
    st.integers(0, 2**16),
)
def test_one_slot_plans_match_the_fresh_balance_with_minimum_moves(
    event: str, nodes: int, seed: int
) -> None:
    """With one slot per rank a movement-aware plan balances as well as a fresh one (within the
    tolerance for hierarchical plans, whose groups keep their nodes) and, for scale-up and
    a failure with a spare in its place, receives one weight per layer."""
    rng = np.random.default_rng(seed)
    layers, experts, ranks = 3, 32, 64
    groups = 8 if nodes > 1 else 1
    load = rng.lognormal(0, 1, (layers, experts))
    previous = plan(load, ranks, 1, num_groups=groups, num_nodes=nodes)
    dead: list[int] = []
    per_node = ranks // nodes
    if event == "drift":
        mapping = RankMapping.identity(ranks)
        load = load * rng.lognormal(0, 0.1, load.shape)
    elif event == "dead":
        dead = [ranks // 3]
        mapping = RankMapping(tuple(None if r in dead else r for r in range(ranks)), ranks)
    else:
        new_per_node = per_node + (2 if event == "up" else -2)
        mapping = RankMapping(
            tuple(
                (r // per_node) * new_per_node + r % per_node
                if r % per_node < new_per_node
                else None
                for r in range(ranks)
            ),
            nodes * new_per_node,
        )
    new_ranks = mapping.new_world_size
    report = plan_with_report(
        load,
        new_ranks,
        1,
        num_groups=groups,
        num_nodes=nodes,
        previous=previous,
        rank_mapping=mapping,
        dead_ranks=dead,
    )
    placement = report.placement
    placement.validate(distinct_ranks=True)
    weight = torch.from_numpy(load)
    fresh = plan(load, new_ranks, 1, num_groups=groups, num_nodes=nodes)
    if nodes == 1:
        assert placement.balancedness(weight) == pytest.approx(fresh.balancedness(weight))
    assert torch.equal(report.transfers, placement.transfers_from(previous, mapping).sum(1))
    if event == "dead":  # a spare takes the dead rank's place: one replica per layer
        assert report.transfers.tolist() == [1] * layers


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([1, 2, 4]),
    st.integers(2, 8),
    st.sampled_from(["drift", "dead", "up", "down"]),
    st.integers(0, 2**16),
)
def test_one_slot_shortcut_is_what_the_general_rule_picks(
    nodes: int, per_node: int, event: str, seed: int
) -> None:
    """One slot per rank, global or one group per node, no budget: the plan skips the fresh
    plan, and gives exactly the placement that comparing the repair with the relabelled fresh
    plan (``repair_choice.prefer_repair``) would give."""
    rng = np.random.default_rng(seed)
    groups, ranks = max(nodes, 1), nodes * per_node
    experts = groups * int(rng.integers(1, per_node + 1))
    load = rng.lognormal(0, 1, (3, experts))
    previous = plan(load, ranks, 1, num_groups=groups, num_nodes=nodes)
    step = {"up": 1, "down": -1}.get(event, 0)
    if event == "dead":
        dead = int(rng.integers(ranks))
        mapping = RankMapping(tuple(None if r == dead else r for r in range(ranks)), ranks)
    else:
        new = per_node + step
        if new < 1 or new * nodes < experts:
            return
        mapping = RankMapping(
            tuple(
                (r // per_node) * new + r % per_node if r % per_node < new else None
                for r in range(ranks)
            ),
            nodes * new,
        )
    if event == "drift":
        load = load * rng.lognormal(0, 0.2, load.shape)
    kept = planner.kept_on_new_ranks(previous, mapping)
    counts = replica_counts(load, mapping.new_world_size, mapping.new_world_size)
    short = repair_choice.single_slot_repair(load, kept, None, groups, nodes, counts)
    assert short is not None
    fresh = planner._fresh(
        load, mapping.new_world_size, 1, groups, nodes, planner.REPAIR_SWAP_STEPS, counts
    )
    before = (kept, equal_split_balance(kept, load))
    global_counts = counts if nodes == 1 else None
    chosen, repaired, _ = repair_choice.prefer_repair(
        load, fresh, before, None, 0.01, (groups, nodes), global_counts, None
    )
    assert repaired.all()
    assert (short == chosen).all()
