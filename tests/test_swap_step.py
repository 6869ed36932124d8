"""The swap step of the movement-aware repair against a straightforward reference: the same
swap chosen, bit for bit, and the bit sets of which experts a rank holds."""

from __future__ import annotations

import numpy as np
import pytest

from elastic_ep.eplb import repair_swaps
from elastic_ep.eplb.expert_bits import before_codes, swap_codes
from elastic_ep.eplb.repair_swaps import (
    _best_paid_swap,
    _block_rows,
    received_codes,
)


def _holds(slots: np.ndarray, rank: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """bool (broadcast shape): whether row ``rank`` of ``slots`` [N, S] holds ``expert``."""
    rank, expert = np.broadcast_arrays(rank, expert)
    return (slots[rank] == expert[..., None]).any(-1) & (expert >= 0)


def _reference(slots, kept, weight, loads, heavy, partner, left):
    """Best swap per heavy rank as the repair scores it, with dense membership tests and
    the [A, S, M, S] arrays of the formula."""
    rows = heavy.size
    r_idx = np.arange(rows)
    hx, px = slots[heavy], slots[partner]
    delta = weight[heavy][:, :, None, None] - weight[partner][:, None, :, :]
    gain = (loads[heavy][:, None] - loads[partner])[:, None, :, None] - delta
    gain = np.minimum(delta, gain)
    x_placed, y_placed = (hx >= 0)[:, :, None], px >= 0
    x_side = np.subtract(
        ~_holds(kept, partner[:, None, :], hx[:, :, None]) & x_placed,
        ~_holds(kept, heavy[:, None], hx)[:, :, None] & x_placed,
        dtype=np.float64,
    )
    y_side = np.subtract(
        ~_holds(kept, heavy[:, None, None], px) & y_placed,
        ~_holds(kept, partner[:, :, None], px) & y_placed,
        dtype=np.float64,
    )
    x_side[_holds(slots, partner[:, None, :], hx[:, :, None])] = np.inf
    x_side[np.broadcast_to((partner == heavy[:, None])[:, None, :], x_side.shape)] = np.inf
    y_side[_holds(slots, heavy[:, None, None], px)] = np.inf
    cost = x_side[:, :, :, None] + y_side[:, None, :, :]
    score = gain / np.maximum(cost, 0.25)
    score[cost > left[:, None, None, None]] = 0.0
    score = score.reshape(rows, -1)
    best = score.argmax(1)
    chosen = gain.reshape(rows, -1)[r_idx, best]
    improved = (score[r_idx, best] > 0) & (chosen > loads[heavy] * 1e-12)
    h_slot, p_idx, p_slot = np.unravel_index(best, (hx.shape[1], partner.shape[1], hx.shape[1]))
    spent = x_side[r_idx, h_slot, p_idx] + y_side[r_idx, p_idx, p_slot]
    return improved, heavy, h_slot, partner[r_idx, p_idx], p_slot, np.where(improved, spent, 0)


def _rank_slots(rng, ranks, per_rank, experts):
    """int64 [ranks, per_rank], distinct experts per rank, some slots empty."""
    out = np.stack([rng.choice(experts, per_rank, replace=False) for _ in range(ranks)])
    out[rng.random(out.shape) < 0.1] = -1
    return out


@pytest.mark.parametrize("seed", range(40))
def test_best_paid_swap_matches_reference(seed, monkeypatch):
    if seed % 2:  # several blocks of heavy ranks, one work area
        monkeypatch.setattr(repair_swaps, "CANDIDATE_BLOCK", 40)
    rng = np.random.default_rng(seed)
    ranks, per_rank = int(rng.integers(4, 40)), int(rng.integers(2, 7))
    experts = int(rng.integers(per_rank + 1, 140))
    slots = _rank_slots(rng, ranks, per_rank, experts)
    # kept: mostly the same slots, some replaced (received weights and free swaps back).
    kept = np.where(
        rng.random(slots.shape) < 0.7, slots, _rank_slots(rng, ranks, per_rank, experts)
    )
    kept = np.stack([np.where(_dupes(row), -1, row) for row in kept])
    weight = np.where(slots >= 0, rng.random(slots.shape), 0.0)
    if seed % 4 == 0:  # ties: equal weights give equal gains and scores
        weight = np.where(slots >= 0, 1.0, 0.0)
    loads = weight.sum(1)
    count = int(rng.integers(1, ranks // 2 + 1))
    ranks_used = rng.permutation(ranks)
    partners = int(rng.integers(1, max(2, (ranks - count) // count + 1)))
    heavy = ranks_used[:count]
    partner = rng.choice(ranks, (count, partners))  # may repeat or be the heavy rank itself
    left = rng.integers(-1, 4, count)
    codes = swap_codes(slots, before_codes(kept, experts))
    fresh = received_codes(codes, slots)
    block = _block_rows(per_rank, partners)
    work = np.empty((2, min(block, count) * per_rank * partners * per_rank))
    got = _best_paid_swap(slots, weight, loads, (codes, fresh), heavy, partner, left, work)
    want = _reference(slots, kept, weight, loads, heavy, partner, left)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


def _dupes(row: np.ndarray) -> np.ndarray:
    """bool [S]: entries of ``row`` equal to an earlier one."""
    return np.array([row[i] >= 0 and row[i] in row[:i] for i in range(row.size)])


@pytest.mark.parametrize("ranks", [3, repair_swaps.ORDER_BITS_FROM, 1024])
def test_lightest_first_is_a_stable_argsort_of_the_loads(ranks: int) -> None:
    """Ties (joined ranks at 0, equal sums) in rank order, on both sides of the width where
    the integer sort takes over; a load rounded just below zero counts as zero."""
    rng = np.random.default_rng(ranks)
    for scale in (3, 1000):  # many ties, then few
        loads = np.floor(rng.random((40, ranks)) * scale) * 0.125
        loads[:, : ranks // 3] = 0.0
        want = loads.argsort(axis=1, kind="stable")
        assert np.array_equal(repair_swaps.lightest_first(loads), want)
    loads = np.array([[0.0, -1e-17] + [1.0] * (ranks - 2)])
    assert repair_swaps.lightest_first(loads)[0, 0] == 0
