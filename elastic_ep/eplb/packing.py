"""Packing replicas onto ranks, vectorised over a batch of independent rows (layers).

Layout used throughout: ``slots`` int64 [B, R, S] holds the logical expert in slot ``s`` of rank
``r`` (-1 = empty); ``per_replica`` float64 [B, E] is each expert's load divided by its replica
count, so a slot's load is ``per_replica[b, slots[b, r, s]]``.

Two steps:

1. :func:`pack_rounds`: S rounds; in each, the next R heaviest replicas go to the ranks sorted by
   current load, heaviest replica to the lightest rank.
   The replicas of one expert are adjacent in that order, so only the first expert of a round
   can already be on a rank (from the previous round); its replicas go to ranks lacking it.
2. :func:`improve_by_swaps`: repeatedly move load off the heaviest rank of every row at once by
   the best single swap (or move into an empty slot) with another rank.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.replication import replica_counts

_SWAP_PARTNERS = 2  # lightest ranks tried per swap step: most of the gain at a fraction of the cost


def sorted_replicas(counts: np.ndarray, per_replica: np.ndarray, num_items: int) -> np.ndarray:
    """int64 [B, num_items]: every replica as its expert id, heaviest first, -1 padded.

    Args:
        counts: int64 [B, E], replicas per expert; every row sums to the same total <= num_items.
        per_replica: float64 [B, E], load of one replica of each expert.
        num_items: width of the result (R * S).
    """
    rows = counts.shape[0]
    total = int(counts[0].sum())
    by_weight = np.argsort(-per_replica, axis=1)
    sorted_counts = np.take_along_axis(counts, by_weight, axis=1)
    # Every row holds the same number of replicas, so one flat repeat expands all rows at once.
    expanded = np.repeat(by_weight.ravel(), sorted_counts.ravel()).reshape(rows, total)
    padded = np.full((rows, num_items), -1, dtype=np.int64)
    padded[:, :total] = expanded
    return padded


def slot_loads(slots: np.ndarray, per_replica: np.ndarray) -> np.ndarray:
    """float64 [B, R, S]: load of every slot (0 for an empty one)."""
    rows = slots.shape[0]
    padded = np.concatenate([np.zeros((rows, 1)), per_replica], axis=1)
    return np.take_along_axis(padded, slots.reshape(rows, -1) + 1, axis=1).reshape(slots.shape)


def pack_rounds(items: np.ndarray, per_replica: np.ndarray, num_ranks: int) -> np.ndarray:
    """int64 [B, R, S]: replicas dealt to ranks in S rounds of R, heaviest to lightest rank.

    Args:
        items: int64 [B, R*S], expert ids heaviest first, -1 = empty (from
            :func:`sorted_replicas`).
        per_replica: float64 [B, E].
        num_ranks: R.
    """
    rows, num_items = items.shape
    slots_per_rank = num_items // num_ranks
    padded = np.concatenate([np.zeros((rows, 1)), per_replica], axis=1)
    weight = np.take_along_axis(padded, items + 1, axis=1)
    slots = np.empty((rows, num_ranks, slots_per_rank), dtype=np.int64)
    loads = np.zeros((rows, num_ranks))
    present = np.zeros((rows, num_ranks, per_replica.shape[1] + 1), dtype=bool)
    row_idx = np.arange(rows)[:, None]
    for k in range(slots_per_rank):
        chunk = slice(k * num_ranks, (k + 1) * num_ranks)
        target = _round_targets(loads, items[:, chunk], present)
        slots[row_idx, target, k] = items[:, chunk]
        loads[row_idx, target] += weight[:, chunk]
        present[row_idx, target, items[:, chunk] + 1] = True
    return slots


def _round_targets(loads: np.ndarray, chunk: np.ndarray, present: np.ndarray) -> np.ndarray:
    """int64 [B, R]: the rank each item of this round goes to, lightest rank first.

    Replicas of one expert are adjacent in the item order, so only the chunk's first expert can
    already sit on some rank (from the previous round). Its replicas here take the lightest
    ranks that lack it; the other items take the remaining ranks by load.
    """
    rows, ranks = chunk.shape
    row_idx = np.arange(rows)[:, None]
    first = chunk[:, :1]
    has_first = present[row_idx, np.arange(ranks)[None, :], first + 1] & (first >= 0)
    span = (chunk == first).sum(1, keepdims=True)
    ceiling = loads.max(1, keepdims=True) + 1.0
    lacking_first = np.argsort(loads + ceiling * has_first, axis=1, kind="stable")
    chosen = np.zeros((rows, ranks), dtype=bool)
    np.put_along_axis(chosen, lacking_first, np.arange(ranks)[None, :] < span, axis=1)
    return np.argsort(loads + ceiling * ~chosen, axis=1, kind="stable")


def presence_of(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, R, E + 1]: copies of each expert on each rank; column 0 counts empty slots."""
    rows, ranks, _ = slots.shape
    present = np.zeros((rows, ranks, num_experts + 1), dtype=np.int64)
    row_idx = np.arange(rows)[:, None, None]
    rank_idx = np.arange(ranks)[None, :, None]
    np.add.at(present, (row_idx, rank_idx, slots + 1), 1)
    return present


def improve_by_swaps(
    slots: np.ndarray,
    per_replica: np.ndarray,
    *,
    max_steps: int,
    partner_ranks: int | None = None,
) -> None:
    """Lower each row's heaviest rank in place by swaps that keep replicas on distinct ranks.

    Each step, in every row still improving, finds the swap between the heaviest rank and one of
    the ``partner_ranks`` lightest ranks (all ranks if ``None``) that lowers the larger of the two
    loads the most; a swap with an empty slot is a plain move. A row stops when no swap helps.

    Args:
        slots: int64 [B, R, S], modified in place.
        per_replica: float64 [B, E].
        max_steps: most swap steps per row.
        partner_ranks: how many of the lightest ranks to consider as swap partners.
    """
    rows, ranks, _ = slots.shape
    partners = ranks if partner_ranks is None else min(partner_ranks, ranks)
    present = presence_of(slots, per_replica.shape[1]) > 0
    present[:, :, 0] = False  # an empty slot may go anywhere
    weight = slot_loads(slots, per_replica)
    active = np.arange(rows)
    for _ in range(max_steps):
        if active.size == 0:
            return
        swap = _best_swaps(slots[active], weight[active], present[active], partners)
        improved = swap[0]
        active = active[improved]
        if active.size == 0:
            return
        _apply_swaps(slots, weight, present, active, *(part[improved] for part in swap[1:]))


def _best_swaps(
    slots: np.ndarray, weight: np.ndarray, present: np.ndarray, partners: int
) -> tuple[np.ndarray, ...]:
    """Best swap per row: (improved [B] bool, heavy rank, heavy slot, partner rank, partner slot)."""
    rows, ranks, per_rank = slots.shape
    row_idx = np.arange(rows)
    loads = weight.sum(2)
    heavy = loads.argmax(1)
    if partners < ranks:
        partner = np.argsort(loads, axis=1, kind="stable")[:, :partners]
    else:
        partner = np.broadcast_to(np.arange(ranks), (rows, ranks))
    heavy_w = weight[row_idx, heavy]  # [B, S]
    heavy_x = slots[row_idx, heavy]
    part_w = weight[row_idx[:, None], partner]  # [B, M, S]
    part_x = slots[row_idx[:, None], partner]
    heavy_load = loads[row_idx, heavy]
    part_load = loads[row_idx[:, None], partner]
    delta = heavy_w[:, :, None, None] - part_w[:, None, :, :]  # [B, S, M, S]
    new_max = np.maximum(
        heavy_load[:, None, None, None] - delta, part_load[:, None, :, None] + delta
    )
    # heavy item may go to the partner rank / partner item may come to the heavy rank
    x_free = ~present[row_idx[:, None, None], partner[:, None, :], (heavy_x + 1)[:, :, None]]
    y_free = ~present[row_idx[:, None, None], heavy[:, None, None], part_x + 1]
    valid = (delta > 0) & x_free[:, :, :, None] & y_free[:, None, :, :]
    valid &= (partner != heavy[:, None])[:, None, :, None]
    score = np.where(valid, new_max, np.inf).reshape(rows, -1)
    best = score.argmin(1)
    improved = score[row_idx, best] < heavy_load * (1 - 1e-12)
    h_slot, p_idx, p_slot = np.unravel_index(best, (per_rank, partner.shape[1], per_rank))
    return improved, heavy, h_slot, partner[row_idx, p_idx], p_slot


def _apply_swaps(
    slots: np.ndarray,
    weight: np.ndarray,
    present: np.ndarray,
    rows: np.ndarray,
    heavy: np.ndarray,
    h_slot: np.ndarray,
    partner: np.ndarray,
    p_slot: np.ndarray,
) -> None:
    x = slots[rows, heavy, h_slot]
    y = slots[rows, partner, p_slot]
    wx = weight[rows, heavy, h_slot]
    wy = weight[rows, partner, p_slot]
    slots[rows, heavy, h_slot], slots[rows, partner, p_slot] = y, x
    weight[rows, heavy, h_slot], weight[rows, partner, p_slot] = wy, wx
    present[rows, heavy, x + 1] = False
    present[rows, partner, y + 1] = False
    present[rows, heavy, y + 1] = True
    present[rows, partner, x + 1] = True
    present[rows, :, 0] = False


def static_slots(
    load: np.ndarray, num_ranks: int, slots_per_rank: int, swap_steps: int
) -> np.ndarray:
    """int64 [B, R, S]: a fresh plan per row, ignoring any previous placement.

    Args:
        load: float64 [B, E], finite, non-negative.
        num_ranks: R; slots_per_rank: S (R * S >= E).
        swap_steps: improvement swaps per row after the rounds.
    """
    counts = replica_counts(load, num_ranks * slots_per_rank, num_ranks)
    per_replica = load / counts
    items = sorted_replicas(counts, per_replica, num_ranks * slots_per_rank)
    slots = pack_rounds(items, per_replica, num_ranks)
    improve_by_swaps(slots, per_replica, max_steps=swap_steps, partner_ranks=_SWAP_PARTNERS)
    return slots
