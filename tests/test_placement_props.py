"""Property tests of Placement and PlacementBuffers (the explicit placement state)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping
from elastic_ep.eplb import EMPTY, Placement, PlacementBuffers
from elastic_ep.eplb.placement import SHARE_FACTOR


@st.composite
def placements(draw: st.DrawFn, allow_empty: bool = True) -> Placement:
    """Arbitrary (possibly wasteful) placements: -1 slots, duplicates on a rank, missing experts."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 10))
    ranks = draw(st.integers(1, 5))
    slots = draw(st.integers(1, 4))
    low = EMPTY if allow_empty else 0
    seed = draw(st.integers(0, 2**16))
    phy2log = np.random.default_rng(seed).integers(low, experts, (layers, ranks * slots))
    return Placement(torch.from_numpy(phy2log), experts, ranks)


@settings(max_examples=150, deadline=None)
@given(placements())
def test_derived_maps_agree_with_phy2log(placement: Placement) -> None:
    phy2log = placement.phy2log
    for layer in range(placement.num_layers):
        for expert in range(placement.num_logical):
            where = (phy2log[layer] == expert).nonzero().flatten()
            assert int(placement.logcnt[layer, expert]) == where.numel()
            row = placement.log2phy[layer, expert]
            assert torch.equal(row[: where.numel()], where)  # ascending slots
            assert bool((row[where.numel() :] == EMPTY).all())
            for rank in range(placement.num_ranks):
                on_rank = bool((placement.rank_of_slot[where] == rank).any())
                assert bool(placement.presence[layer, rank, expert]) == on_rank
    assert int(placement.logcnt.sum()) == int((phy2log >= 0).sum())


@settings(max_examples=100, deadline=None)
@given(placements(), st.integers(0, 2**16))
def test_metrics_are_consistent(placement: Placement, seed: int) -> None:
    load = torch.from_numpy(np.random.default_rng(seed).lognormal(0, 1, placement.logcnt.shape))
    rank_loads = placement.rank_loads(load)
    placed = placement.logcnt > 0
    assert torch.allclose(rank_loads.sum(1), (load * placed).sum(1))  # load conserved
    assert 0.0 <= placement.balancedness(load) <= 1.0 + 1e-12
    assert int(placement.transfers_from(placement).sum()) == 0
    empty = Placement.empty(
        placement.num_layers, placement.num_logical, placement.num_ranks, placement.slots_per_rank
    )
    # from nothing, every distinct (rank, expert) pair is received once
    assert torch.equal(placement.transfers_from(empty), placement.presence.sum(-1))


@settings(max_examples=100, deadline=None)
@given(placements(), st.data())
def test_lost_with_and_transfers_under_a_mapping(placement: Placement, data: st.DataObject) -> None:
    dead = data.draw(st.sets(st.integers(0, placement.num_ranks - 1)))
    lost = placement.lost_with(dead)
    alive = [r for r in range(placement.num_ranks) if r not in dead]
    held = placement.presence[:, alive].any(1) if alive else torch.zeros_like(lost)
    assert torch.equal(lost, (placement.logcnt > 0) & ~held)
    if alive:
        mapping = RankMapping.without(placement.num_ranks, sorted(dead))
        survivors = Placement(
            placement.phy2log.view(placement.num_layers, placement.num_ranks, -1)[:, alive].reshape(
                placement.num_layers, -1
            ),
            placement.num_logical,
            len(alive),
        )
        assert int(survivors.transfers_from(placement, mapping).sum()) == 0


def test_validate_names_what_is_wrong() -> None:
    p = Placement(torch.tensor([[0, 0, 1, -1]]), 3, 2)
    with pytest.raises(ValueError, match="layer 0: logical expert 2 has no replica"):
        p.validate()
    p.validate(allow_missing=True)
    with pytest.raises(ValueError, match="layer 0: rank 0 holds two replicas"):
        p.validate(allow_missing=True, distinct_ranks=True)
    with pytest.raises(ValueError, match=r"phy2log\[0, 1\] = 5"):
        Placement(torch.tensor([[0, 5]]), 3, 1)
    with pytest.raises(TypeError, match="int64"):
        Placement(torch.tensor([[0, 1]], dtype=torch.int32), 3, 1)
    with pytest.raises(ValueError, match="not a multiple of num_ranks=3"):
        Placement(torch.tensor([[0, 1]]), 3, 3)
    with pytest.raises(ValueError, match="load must have shape"):
        Placement(torch.tensor([[0, 1]]), 2, 1).balancedness(torch.ones(2, 2))
    with pytest.raises(ValueError, match="finite and non-negative"):
        Placement(torch.tensor([[0, 1]]), 2, 1).balancedness(torch.tensor([[1.0, -1.0]]))


def test_placement_is_a_private_copy() -> None:
    source = torch.tensor([[0, 1]])
    p = Placement(source, 2, 1)
    source[0, 0] = 1
    assert int(p.phy2log[0, 0]) == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(placements(), min_size=1, max_size=4),
    st.floats(1.0, 3.0),
    st.sampled_from([1, 2, SHARE_FACTOR]),
)
def test_buffers_update_in_place(
    sequence: list[Placement], factor: float, share_factor: int
) -> None:
    first = sequence[0]
    buffers = PlacementBuffers(
        first.num_layers, first.num_logical, factor, share_factor=share_factor
    )
    assert buffers.capacity == math.ceil(factor * first.num_logical)
    pointers = (buffers.phy2log.data_ptr(), buffers.log2phy.data_ptr(), buffers.logcnt.data_ptr())
    for placement in sequence:
        if (placement.num_layers, placement.num_logical) != (
            buffers.num_layers,
            buffers.num_logical,
        ):
            with pytest.raises(ValueError, match="buffers are"):
                buffers.update_(placement)
            continue
        before = buffers.phy2log.clone()
        fits = (
            placement.num_slots <= buffers.capacity
            and int(placement.logcnt.max()) <= buffers.row_width
        )
        if placement.num_slots > buffers.capacity:
            with pytest.raises(
                ValueError, match=f"max_physical_factor={buffers.max_physical_factor}"
            ):
                buffers.update_(placement)
            assert torch.equal(buffers.phy2log, before)  # unchanged after a refused update
            continue
        if not fits:  # an expert with more entries than a log2phy row can hold
            with pytest.raises(ValueError, match="log2phy row holds at most"):
                buffers.update_(placement)
            assert torch.equal(buffers.phy2log, before)
            continue
        buffers.update_(placement)
        n = placement.num_slots
        assert torch.equal(buffers.phy2log[:, :n], placement.phy2log)
        assert bool((buffers.phy2log[:, n:] == EMPTY).all())
        assert torch.equal(buffers.logcnt, placement.logcnt)
        width = placement.log2phy.shape[2]
        assert torch.equal(buffers.log2phy[:, :, :width], placement.log2phy)
        assert bool((buffers.log2phy[:, :, width:] == EMPTY).all())
    assert pointers == (
        buffers.phy2log.data_ptr(),
        buffers.log2phy.data_ptr(),
        buffers.logcnt.data_ptr(),
    )


def test_buffers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"max_physical_factor must be >= 1\.0"):
        PlacementBuffers(2, 8, 0.5)
    with pytest.raises(ValueError, match="num_layers"):
        PlacementBuffers(0, 8, 1.5)
    buffers = PlacementBuffers(1, 4, 1.25)  # capacity 5
    too_big = Placement(torch.tensor([[0, 1, 2, 3, 0, 1]]), 4, 2)
    with pytest.raises(ValueError, match=r"needs 6 physical slots .* capacity 5 .* factor >= 1\.5"):
        buffers.update_(too_big)
