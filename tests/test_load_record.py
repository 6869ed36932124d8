"""LoadRecord: per-step logical counts in a sliding window, and their sum over ranks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import PlacementBuffers
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.moe import LoadRecord, route_to_slots
from tests.procs import run_ranks
from tests.test_routing import random_placement

LAYERS, EXPERTS = 2, 6


def _step_ids(gen: torch.Generator, tokens: int) -> torch.Tensor:
    return (
        torch.stack([torch.randperm(EXPERTS, generator=gen)[:2] for _ in range(tokens)])
        if tokens
        else torch.empty(0, 2, dtype=torch.int64)
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31))
def test_window_holds_last_steps_across_placement_changes(
    window: int, steps: int, seed: int
) -> None:
    """The window sums the logical loads of the last ``window`` steps, even though the
    placement (and so the slot numbering) changes between steps."""
    gen = torch.Generator().manual_seed(seed)
    buffers = PlacementBuffers(LAYERS, EXPERTS, 3.0)
    record = LoadRecord(LAYERS, EXPERTS, buffers.capacity, window)
    history = []
    for _ in range(steps):
        ranks = int(torch.randint(1, 4, (1,), generator=gen))
        buffers.update_(random_placement(gen, LAYERS, EXPERTS, ranks, -(-EXPERTS // ranks) + 1))
        expected = torch.zeros(LAYERS, EXPERTS)
        for layer in range(LAYERS):
            ids = _step_ids(gen, int(torch.randint(0, 9, (1,), generator=gen)))
            slots = route_to_slots(ids, buffers.log2phy[layer], buffers.logcnt[layer])
            record.record_(layer, slots, buffers.phy2log[layer])
            expected[layer] = torch.bincount(ids.reshape(-1), minlength=EXPERTS).float()
            assert torch.equal(
                record.slot_counts[layer],
                torch.bincount(slots.reshape(-1), minlength=buffers.capacity).to(torch.int32),
            )
        record.end_step()
        history.append(expected)
        assert record.steps_recorded == min(len(history), window)
        assert torch.equal(
            record.logical_load(), sum(history[-window:], torch.zeros(LAYERS, EXPERTS))
        )
    assert int(record.step_counts.abs().sum()) == 0 and int(record.slot_counts.abs().sum()) == 0
    record.reset()
    assert record.steps_recorded == 0 and int(record.logical_load().sum()) == 0


def test_empty_slots_and_dropped_pairs_are_not_counted() -> None:
    record = LoadRecord(1, 3, 4, 2)
    phy2log = torch.tensor([2, -1, 0, 1])
    # Slots 0, 2, 2, 3, 0 count; -1 (dropped pair) and slot 1 (empty) do not.
    record.record_(0, torch.tensor([[0, 2], [-1, 2], [3, 0], [1, -1]]), phy2log)
    assert record.slot_counts[0].tolist() == [2, 1, 2, 1]
    record.end_step()
    assert record.logical_load().tolist() == [[2.0, 1.0, 2.0]]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="window"):
        LoadRecord(1, 3, 4, 0)
    with pytest.raises(ValueError, match="num_logical"):
        LoadRecord(1, True, 4, 2)
    record = LoadRecord(1, 3, 4, 2)
    with pytest.raises(ValueError, match="layer"):
        record.record_(1, torch.tensor([[0]]), torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="phy2log"):
        record.record_(0, torch.tensor([[0]]), torch.tensor([0, 1, 2]))
    assert record.steps_recorded == 0 and int(record.step_counts.sum()) == 0


def _aggregate_rank(rank: int, world_size: int, port: int) -> list[list[float]]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=20)
    group = StatelessGroup(rdzv, "load", 0, rank, world_size, timeout_s=20)
    record = LoadRecord(1, 3, 3, window=2)
    phy2log = torch.tensor([0, 1, 2])
    # Three steps; the window keeps the last two. Rank r routes r+1 pairs to slot r % 3 per step.
    for step in range(3):
        slots = torch.full((rank + 1 + step, 1), rank % 3)
        record.record_(0, slots, phy2log)
        record.end_step()
    total = record.aggregate(group)
    group.barrier()
    group.destroy()
    rdzv.close()
    return total.tolist()


def test_aggregate_sums_windows_over_ranks() -> None:
    results = run_ranks(_aggregate_rank, 4, timeout=60)
    # Rank r contributes (r+2) + (r+3) to expert r % 3 (steps 1 and 2).
    expected = [0.0, 0.0, 0.0]
    for rank in range(4):
        expected[rank % 3] += 2 * rank + 5
    assert all(r == [expected] for r in results), results
