"""The chunk placement of the movement-aware repair's step one (eplb/incremental.py) against
the straightforward version it replaced (tuples of index arrays, a three-key lexsort): the same
slots, bit for bit, on random rows with empty slots, surplus replicas, ties and orphans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import incremental
from elastic_ep.eplb.incremental import fill_missing, rank_order
from elastic_ep.eplb.repair_swaps import any_slot
from elastic_ep.eplb.replication import replica_counts


def _reference_chunk(slots, slot_w, per_replica, counts, have, rank_load, open_slots, b, expert):
    """:func:`incremental._place_chunk` as first written (same arguments and result)."""
    n, width = expert.shape
    cur = slots[b]
    weight = slot_w[b]
    loads = rank_load[b]
    surplus = have[b] - counts[b]
    row = np.arange(n)[:, None, None]
    evictable = (cur >= 0) & (surplus[row, np.maximum(cur, 0)] > 0)
    evict_slot = np.where(evictable, weight, -np.inf).argmax(2)
    relief = np.take_along_axis(weight, evict_slot[..., None], 2)[..., 0]
    is_open = open_slots[b] > 0
    usable = is_open | any_slot(evictable)
    order = np.lexsort((np.where(is_open, loads, loads - relief), ~is_open, ~usable), axis=1)
    rank = order[:, :width]
    rows = np.arange(n)[:, None]
    held = any_slot(cur[rows, rank] == expert[..., None])
    placed = (expert >= 0) & usable[rows, rank] & ~held
    opened = is_open[rows, rank]
    slot = np.where(opened, (cur[rows, rank] < 0).argmax(2), evict_slot[rows, rank])
    evicted = np.where(placed & ~opened, cur[rows, rank, slot], -1)
    i, j = np.nonzero(evicted >= 0)
    if i.size:
        key = i * per_replica.shape[1] + evicted[i, j]
        by_key = np.argsort(key, kind="stable")
        sorted_key = key[by_key]
        starts = np.flatnonzero(np.diff(sorted_key, prepend=-1))
        run = np.arange(key.size) - np.repeat(starts, np.diff(starts, append=key.size))
        nth = np.empty_like(run)
        nth[by_key] = run
        over = nth >= surplus[i, evicted[i, j]]
        placed[i[over], j[over]] = False
        evicted[i[over], j[over]] = -1
    i, j = np.nonzero(placed)
    rb, rr, rs, x = b[i], rank[i, j], slot[i, j], expert[i, j]
    gone = evicted[i, j]
    open_slots[rb[gone < 0], rr[gone < 0]] -= 1
    np.subtract.at(have, (rb[gone >= 0], gone[gone >= 0]), 1)
    np.add.at(have, (rb, x), 1)
    rank_load[rb, rr] += per_replica[rb, x] - slot_w[rb, rr, rs]
    slot_w[rb, rr, rs] = per_replica[rb, x]
    slots[rb, rr, rs] = x
    return placed


def _problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a scale event: slots with empty slots and lost experts, loads with ties."""
    rng = np.random.default_rng(seed)
    rows, ranks, per_rank = (
        int(rng.integers(1, 6)),
        int(rng.integers(2, 13)),
        int(rng.integers(2, 6)),
    )
    experts = int(rng.integers(per_rank + 1, ranks * per_rank + 1))
    load = rng.integers(1, 6, (rows, experts)).astype(np.float64)  # small integers: ties
    counts = replica_counts(load, ranks * per_rank, ranks)
    slots = np.stack(
        [np.stack([rng.permutation(experts)[:per_rank] for _ in range(ranks)]) for _ in range(rows)]
    ).astype(np.int64)
    slots[rng.random(slots.shape) < rng.random()] = -1  # joined ranks, lost replicas
    budget = rng.integers(0, ranks * per_rank, rows)
    return slots, load, counts, budget


@pytest.mark.parametrize("seed", range(60))
def test_fill_missing_matches_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    slots, load, counts, budget = _problem(seed)
    got = slots.copy()
    fill_missing(got, load, counts, budget.copy())
    monkeypatch.setattr(incremental, "_place_chunk", _reference_chunk)
    want = slots.copy()
    fill_missing(want, load, counts, budget.copy())
    assert np.array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**16))
def test_rank_order_is_the_lexsort(rows: int, ranks: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Few distinct values, signed zeros among them: ties everywhere.
    value = rng.choice([-1.5, -0.0, 0.0, 0.25, 3.0], (rows, ranks))
    usable, is_open = rng.random((2, rows, ranks)) < 0.5
    want = np.lexsort((value, ~is_open, ~usable), axis=1)
    assert np.array_equal(rank_order(usable, is_open, value), want)
