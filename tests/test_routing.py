"""Routing of logical top-k ids to physical slots, and gating (pure, single process)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import Placement, PlacementBuffers
from elastic_ep.moe import count_slot_tokens_, route_to_slots, topk_gating


def random_placement(
    gen: torch.Generator, layers: int, experts: int, ranks: int, per_rank: int, empty_p: float = 0.3
) -> Placement:
    """Every expert at least once; the other slots hold random replicas or are empty (-1)."""
    slots = ranks * per_rank
    if slots < experts:
        raise ValueError("not enough slots")
    phy2log = torch.empty(layers, slots, dtype=torch.int64)
    for layer in range(layers):
        row = torch.randint(0, experts, (slots,), generator=gen)
        row[torch.rand(slots, generator=gen) < empty_p] = -1
        row[torch.randperm(slots, generator=gen)[:experts]] = torch.randperm(experts, generator=gen)
        phy2log[layer] = row
    return Placement(phy2log, experts, ranks)


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    experts = draw(st.integers(1, 9))
    ranks = draw(st.integers(1, 4))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return random_placement(gen, draw(st.integers(1, 3)), experts, ranks, per_rank)


@st.composite
def routing_cases(draw: st.DrawFn) -> tuple[Placement, torch.Tensor, int]:
    placement = draw(placements())
    tokens = draw(st.integers(0, 40))
    top_k = draw(st.integers(1, placement.num_logical))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ids = (
        torch.stack(
            [torch.randperm(placement.num_logical, generator=gen)[:top_k] for _ in range(tokens)]
        )
        if tokens
        else torch.empty(0, top_k, dtype=torch.int64)
    )
    return placement, ids, draw(st.integers(0, 7))


@settings(max_examples=150, deadline=None)
@given(routing_cases())
def test_every_routed_slot_holds_the_routed_expert(
    case: tuple[Placement, torch.Tensor, int],
) -> None:
    placement, ids, offset = case
    for layer in range(placement.num_layers):
        slots = route_to_slots(
            ids, placement.log2phy[layer], placement.logcnt[layer], rank_offset=offset
        )
        assert slots.shape == ids.shape and slots.dtype == torch.int64
        assert bool((slots >= 0).all())
        assert torch.equal(placement.phy2log[layer][slots], ids)


@settings(max_examples=150, deadline=None)
@given(routing_cases())
def test_pairs_spread_evenly_over_replicas(case: tuple[Placement, torch.Tensor, int]) -> None:
    placement, ids, offset = case
    for layer in range(placement.num_layers):
        slots = route_to_slots(
            ids, placement.log2phy[layer], placement.logcnt[layer], rank_offset=offset
        )
        per_slot = torch.bincount(slots.reshape(-1), minlength=placement.num_slots)
        for expert in range(placement.num_logical):
            replica_slots = placement.log2phy[layer, expert, : placement.logcnt[layer, expert]]
            loads = per_slot[replica_slots]
            assert int(loads.max() - loads.min()) <= 1, (expert, loads)


@settings(max_examples=100, deadline=None)
@given(routing_cases())
def test_fixed_address_buffers_route_like_the_placement(
    case: tuple[Placement, torch.Tensor, int],
) -> None:
    placement, ids, offset = case
    buffers = PlacementBuffers(
        placement.num_layers,
        placement.num_logical,
        placement.num_slots / placement.num_logical + 0.5,
    )
    buffers.update_(placement)
    for layer in range(placement.num_layers):
        expected = route_to_slots(
            ids, placement.log2phy[layer], placement.logcnt[layer], rank_offset=offset
        )
        got = route_to_slots(ids, buffers.log2phy[layer], buffers.logcnt[layer], rank_offset=offset)
        assert torch.equal(got, expected)


def test_rank_offset_rotates_the_first_replica() -> None:
    # Expert 0 has replicas in slots 0, 2, 4; one token per rank picks it.
    placement = Placement(torch.tensor([[0, 1, 0, 2, 0, -1]]), 3, 2)
    ids = torch.tensor([[0]])
    chosen = [
        int(route_to_slots(ids, placement.log2phy[0], placement.logcnt[0], rank_offset=r))
        for r in range(4)
    ]
    assert chosen == [0, 2, 4, 0]
    # Deterministic: same inputs, same slots.
    many = torch.tensor([[0, 1], [0, 2], [2, 0], [0, 1]])
    first = route_to_slots(many, placement.log2phy[0], placement.logcnt[0], rank_offset=1)
    assert torch.equal(
        first, route_to_slots(many, placement.log2phy[0], placement.logcnt[0], rank_offset=1)
    )
    assert first.tolist() == [[2, 1], [4, 3], [3, 0], [2, 1]]


def test_expert_without_replica_routes_to_minus_one() -> None:
    placement = Placement(torch.tensor([[0, -1, 0, -1]]), 2, 2)
    slots = route_to_slots(torch.tensor([[1, 0]]), placement.log2phy[0], placement.logcnt[0])
    assert slots.tolist() == [[-1, 0]]


def test_bad_inputs_raise_clearly() -> None:
    placement = Placement(torch.tensor([[0, 1]]), 2, 1)
    l2p, cnt = placement.log2phy[0], placement.logcnt[0]
    with pytest.raises(TypeError, match="topk_ids must be int64"):
        route_to_slots(torch.tensor([[0]], dtype=torch.int32), l2p, cnt)
    with pytest.raises(TypeError, match="topk_ids must be int64"):
        route_to_slots(torch.tensor([0]), l2p, cnt)
    with pytest.raises(TypeError, match="log2phy"):
        route_to_slots(torch.tensor([[0]]), l2p.float(), cnt)
    with pytest.raises(TypeError, match="logcnt"):
        route_to_slots(torch.tensor([[0]]), l2p, cnt[:1])
    with pytest.raises(ValueError, match="rank_offset"):
        route_to_slots(torch.tensor([[0]]), l2p, cnt, rank_offset=-1)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(0, 20), st.integers(0, 2**31))
def test_count_slot_tokens_counts_non_empty_slots(capacity: int, pairs: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randint(-1, capacity, (pairs, 2), generator=gen)
    counts = torch.full((capacity,), 5, dtype=torch.int32)
    count_slot_tokens_(counts, slots)
    valid = slots[slots >= 0]
    assert torch.equal(counts, 5 + torch.bincount(valid, minlength=capacity).to(torch.int32))


def test_topk_gating() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, gate = torch.randn(7, 8, generator=gen), torch.randn(5, 8, generator=gen)
    weights, ids = topk_gating(hidden, gate, 2)
    probs = torch.softmax(hidden @ gate.t(), -1)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (7, 2)
    assert torch.equal(ids, probs.topk(2).indices)
    assert torch.allclose(weights.sum(-1), torch.ones(7))
    raw, _ = topk_gating(hidden, gate, 2, renormalize=False)
    assert torch.allclose(raw, probs.topk(2).values)
    with pytest.raises(ValueError, match="top_k"):
        topk_gating(hidden, gate, 6)
    with pytest.raises(ValueError, match="gate_weight"):
        topk_gating(hidden, gate[:, :4], 2)
