"""The chunk placement of the movement-aware repair's step one (eplb/incremental.py) against the
rule written row by row and item by item: the same slots, bit for bit, on random rows with
empty slots (several per rank: rounds of them in one chunk), surplus replicas, ties and
orphans."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import incremental
from elastic_ep.eplb.incremental import fill_missing, rank_order
from elastic_ep.eplb.replication import replica_counts


def _reference_chunk(slots, slot_w, per_replica, counts, have, rank_load, open_slots, b, expert):
    """:func:`incremental._place_chunk` written row by row and item by item (same arguments and
    result): an empty slot of every open rank, lightest first, then one eviction per rank
    holding a surplus replica, lightest after it, then the further empty slots of a row's only
    open rank."""
    n, width = expert.shape
    _, ranks, per_rank = slots.shape
    placed = np.zeros((n, width), dtype=bool)
    for i, row in enumerate(b.tolist()):
        cur = slots[row].copy()
        surplus = have[row] - counts[row]
        evict_slot, value, usable = [], [], []
        for r in range(ranks):
            weights = [
                slot_w[row, r, s] if cur[r, s] >= 0 and surplus[cur[r, s]] > 0 else -np.inf
                for s in range(per_rank)
            ]
            evict_slot.append(int(np.argmax(weights)))
            is_open = open_slots[row, r] > 0
            usable.append(is_open or max(weights) > -np.inf)
            relief = slot_w[row, r, evict_slot[r]]
            value.append(rank_load[row, r] if is_open else rank_load[row, r] - relief)
        order = sorted(
            range(ranks),
            key=lambda r: (not usable[r], open_slots[row, r] == 0, value[r], r),
        )
        targets = [(r, 0) for r in order if open_slots[row, r] > 0] + [
            (r, -1) for r in order if usable[r] and open_slots[row, r] == 0
        ]
        open_ranks = [r for r in order if open_slots[row, r] > 0]
        if len(open_ranks) == 1:
            targets += [(open_ranks[0], k) for k in range(1, open_slots[row, open_ranks[0]])]
        moves = []  # (j, rank, slot, evicted)
        taken = set()
        evictions: dict[int, int] = {}
        for j in range(min(width, len(targets))):
            x = int(expert[i, j])
            r, k = targets[j]
            if x < 0 or x in cur[r] or (r, x) in taken:
                continue
            if k >= 0:
                slot = [s for s in range(per_rank) if cur[r, s] < 0][k]
                gone = -1
            else:
                slot = evict_slot[r]
                gone = int(cur[r, slot])
                if evictions.get(gone, 0) >= surplus[gone]:
                    continue
                evictions[gone] = evictions.get(gone, 0) + 1
            taken.add((r, x))
            moves.append((j, r, slot, gone))
        for j, r, slot, gone in moves:
            x = int(expert[i, j])
            placed[i, j] = True
            if gone < 0:
                open_slots[row, r] -= 1
            else:
                have[row, gone] -= 1
            have[row, x] += 1
            rank_load[row, r] += per_replica[row, x] - slot_w[row, r, slot]
            slot_w[row, r, slot] = per_replica[row, x]
            slots[row, r, slot] = x
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


@pytest.mark.parametrize("seed", range(200))
def test_fill_missing_matches_reference(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    slots, load, counts, budget = _problem(seed)
    got = slots.copy()
    fill_missing(got, load, counts, budget.copy())
    monkeypatch.setattr(incremental, "_place_chunk", _reference_chunk)
    want = slots.copy()
    fill_missing(want, load, counts, budget.copy())
    assert np.array_equal(got, want)


def test_a_chunk_fills_several_empty_slots_of_one_rank() -> None:
    """8 full ranks and a joined one with 9 empty slots, 9 replicas wanted (8 -> 9 x 9 slots):
    one chunk fills all nine. With a second rank with room (one slot) a chunk of three puts one
    replica on each: several ranks with room take one each and the chunk's loads refresh. One
    target per rank took 10 chunks and 4 single placements for the joined rank's 9 replicas."""
    experts, per_rank = 40, 9
    slots = np.full((1, 10, per_rank), -1, dtype=np.int64)
    for r in range(8):
        slots[0, r] = (np.arange(per_rank) + r * per_rank) % experts
    slots[0, 9] = np.arange(31, 40)
    load = np.linspace(20.0, 1.0, experts)[None]  # experts 0..8 heaviest
    have = np.bincount(slots[slots >= 0], minlength=experts)[None]
    counts = have.copy()
    counts[0, :9] += 1
    for place in (_reference_chunk, incremental._place_chunk):
        one = slots.copy()
        assert place(one, *_state(one, load, counts), np.array([0]), np.arange(9)[None]).all()
        assert (one[0, 8] >= 0).all()
        two = slots.copy()
        two[0, 9, 0] = -1
        placed = place(two, *_state(two, load, counts), np.array([0]), np.arange(3)[None])
        assert placed.tolist() == [[True, True, False]]
        assert (two[0, 8] >= 0).sum() == 1 and (two[0, 9] >= 0).all()
    filled = slots.copy()
    fill_missing(filled, load, counts, np.array([9]))
    assert (filled >= 0).all()
    assert np.array_equal(np.bincount(filled.ravel(), minlength=experts)[None], counts)


def test_a_chunk_wider_than_the_ranks_keeps_one_target_per_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Row 0's one open rank has 4 empty slots on 2 ranks and nothing to place, so the chunk is
    4 wide; row 1 has two open ranks and 3 replicas to place: one per rank, the third waits."""
    slots = np.array(
        [[[5, -1, -1, -1, -1], [0, 1, 2, 3, 4]], [[0, 1, 2, -1, -1], [3, 4, 5, -1, -1]]],
        dtype=np.int64,
    )
    load = np.ones((2, 6))
    counts = np.array([[1, 1, 1, 1, 1, 1], [2, 2, 1, 2, 1, 1]])
    got = slots.copy()
    fill_missing(got, load, counts, np.array([1, 3]))
    monkeypatch.setattr(incremental, "_place_chunk", _reference_chunk)
    want = slots.copy()
    fill_missing(want, load, counts, np.array([1, 3]))
    assert np.array_equal(got, want)
    assert np.array_equal(np.bincount(got[1][got[1] >= 0], minlength=6), counts[1])


def _state(slots: np.ndarray, load: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """The state arrays of a chunk for ``slots`` int64 [1, R, S] and ``counts`` int64 [1, E]
    wanted: slot loads, load per replica, counts, held replicas, rank loads, empty slots."""
    per_replica = load / counts
    slot_w = np.where(slots >= 0, per_replica[0, np.maximum(slots, 0)], 0.0)
    have = np.bincount(slots[slots >= 0], minlength=load.shape[1])[None]
    return [slot_w, per_replica, counts, have, slot_w.sum(2), (slots < 0).sum(2)]


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**16))
def test_rank_order_is_the_lexsort(rows: int, ranks: int, seed: int) -> None:
    # Both sides of ORDER_BITS_FROM (complex keys below, integer keys from there).
    rng = np.random.default_rng(seed)
    # Few distinct values, signed zeros and a rounding below zero among them: ties everywhere.
    value = rng.choice([-1e-17, -0.0, 0.0, 0.25, 3.0, 1e300], (rows, ranks))
    usable, is_open = rng.random((2, rows, ranks)) < 0.5
    want = np.lexsort((np.maximum(value, 0.0), ~is_open, ~usable), axis=1)
    assert np.array_equal(rank_order(usable, is_open, value), want)
