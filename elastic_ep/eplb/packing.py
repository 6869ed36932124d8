"""Packing replicas onto ranks, vectorised over a batch of independent rows (layers).

Layout used throughout: ``slots`` int64 [B, R, S] holds the logical expert in slot ``s`` of rank
``r`` (-1 = empty); ``per_replica`` float64 [B, E] is each expert's load divided by its replica
count, so a slot's load is ``per_replica[b, slots[b, r, s]]``.

Two steps:

1. :func:`pack_rounds`: S rounds; in each, the next R heaviest replicas go to the ranks sorted by
   current load, heaviest replica to the lightest rank.
   The replicas of one expert are adjacent in that order, so only the first expert of a round
   can already be on a rank (from the previous round); its replicas go to ranks lacking it.
2. :func:`improve_by_swaps`: repeatedly move load off the heaviest ranks of every row at once by
   the best single swap (or move into an empty slot) with one of the lightest ranks.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.replication import replica_counts

_SWAP_PAIR_BUDGET = 128  # rows x rank pairs per swap step: keeps a step's arrays small


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
    weight = np.take_along_axis(padded, items + 1, axis=1).reshape(rows, slots_per_rank, num_ranks)
    chunks = items.reshape(rows, slots_per_rank, num_ranks)
    targets = np.empty((rows, slots_per_rank, num_ranks), dtype=np.int64)
    # Loads kept in the order of the last round's ranks (``ranks``): re-sorting is then a gather.
    loads = np.zeros((rows, num_ranks))
    ranks = np.broadcast_to(np.arange(num_ranks), (rows, num_ranks))
    row_idx = np.arange(rows)[:, None]
    for k in range(slots_per_rank):
        order = np.argsort(loads, axis=1, kind="stable")
        if k:
            _avoid_second_replica(order, ranks, chunks[:, k], chunks[:, k - 1])
        loads = loads[row_idx, order] + weight[:, k]
        ranks = ranks[row_idx, order]
        targets[:, k] = ranks
    slots = np.empty((rows, num_ranks, slots_per_rank), dtype=np.int64)
    slots[row_idx[:, :, None], targets.transpose(0, 2, 1), np.arange(slots_per_rank)] = (
        chunks.transpose(0, 2, 1)
    )
    return slots


def _avoid_second_replica(
    order: np.ndarray, ranks: np.ndarray, chunk: np.ndarray, last: np.ndarray
) -> None:
    """Fix ``order`` [B, R] (positions sorted by load, for this round's items) in place where
    this round's first expert also ended the previous round, whose item i went to the rank at
    position i (``ranks`` gives the rank of each position; ``last`` that round's items).

    Replicas of one expert are adjacent in the item order, so that is the only way a rank could
    get a second replica. Those replicas (the first items) then take the lightest ranks that
    lack the expert (there are enough: an expert has at most R replicas); the other items keep
    the load order.
    """
    first = chunk[:, :1]
    straddle = np.flatnonzero((last[:, -1:] == first)[:, 0] & (first[:, 0] >= 0))
    if straddle.size == 0:
        return
    rows = np.arange(straddle.size)[:, None]
    sorted_pos = order[straddle]
    holds = (last[straddle] == first[straddle])[rows, sorted_pos]  # per sorted position
    span = (chunk[straddle] == first[straddle]).sum(1, keepdims=True)
    chosen = ~holds & (np.cumsum(~holds, axis=1) <= span)
    order[straddle] = sorted_pos[rows, np.argsort(~chosen, axis=1, kind="stable")]


def presence_of(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, R, E + 1]: copies of each expert on each rank; column 0 counts empty slots."""
    rows, ranks, _ = slots.shape
    cell = np.arange(rows * ranks).reshape(rows, ranks, 1) * (num_experts + 1)
    flat = np.bincount((cell + slots + 1).ravel(), minlength=rows * ranks * (num_experts + 1))
    return flat.reshape(rows, ranks, num_experts + 1)


def improve_by_swaps(
    slots: np.ndarray, per_replica: np.ndarray, *, max_steps: int, pairs: int | None = None
) -> None:
    """Lower the heaviest ranks of every row in place by swaps that keep replicas distinct.

    Each step, in every row still improving, applies the swap (or move into an empty slot) that
    lowers the larger load of a rank pair the most: with ``pairs=None`` between the heaviest
    rank and any other; with ``pairs=k``, for each of the k heaviest ranks with its counterpart
    among the k lightest (heaviest with lightest). The pairs share no rank, so their swaps are
    independent. A row stops when no pair improves.

    Args:
        slots: int64 [B, R, S], modified in place.
        per_replica: float64 [B, E].
        max_steps: most swap steps per row.
        pairs: rank pairs per step (at most R // 2), or ``None`` for heaviest-vs-all.
    """
    ranks = slots.shape[1]
    if ranks < 2:
        return
    pairs = None if pairs is None else min(pairs, ranks // 2)
    weight = slot_loads(slots, per_replica)
    active = np.arange(slots.shape[0])
    for _ in range(max_steps):
        improved, heavy, h_slot, light, l_slot = _best_swaps(slots[active], weight[active], pairs)
        row, pair = np.nonzero(improved)
        heavy, h_slot, light, l_slot = (x[row, pair] for x in (heavy, h_slot, light, l_slot))
        row = active[row]
        for table in (slots, weight):
            a, b = table[row, heavy, h_slot], table[row, light, l_slot]
            table[row, heavy, h_slot], table[row, light, l_slot] = b, a
        active = active[improved.any(1)]
        if active.size == 0:
            return


def _best_swaps(slots: np.ndarray, weight: np.ndarray, pairs: int | None) -> tuple[np.ndarray, ...]:
    """Best swap per heavy rank: (improved, heavy rank, heavy slot, partner rank, partner slot),
    each [B, k] (k = 1 with ``pairs=None``)."""
    rows, _, per_rank = slots.shape
    row_idx = np.arange(rows)[:, None, None]
    loads = weight.sum(2)
    by_load = np.argsort(loads, axis=1)
    if pairs is None:  # heaviest against all others: one heavy rank, R - 1 partners
        heavy = by_load[:, -1:]
        partner = by_load[:, None, :-1]
    else:
        heavy = by_load[:, : -pairs - 1 : -1]
        partner = by_load[:, :pairs, None]
    heavy_x = slots[row_idx[:, :, 0], heavy][:, :, None]  # [B, k, 1, S]
    part_x = slots[row_idx, partner]  # [B, k, M, S]
    heavy_load = loads[row_idx[:, :, 0], heavy]  # [B, k]
    delta = (
        weight[row_idx[:, :, 0], heavy][:, :, None, :, None]
        - weight[row_idx, partner][..., None, :]
    )
    new_max = np.maximum(
        heavy_load[:, :, None, None, None] - delta, loads[row_idx, partner][..., None, None] + delta
    )  # [B, k, M, S, S]
    same = heavy_x[..., :, None] == part_x[..., None, :]
    # the heavy item must be new to the partner rank and the partner item new to the heavy rank
    valid = (delta > 0) & ~(same.any(4, keepdims=True) & (heavy_x >= 0)[..., None])
    valid &= ~(same.any(3, keepdims=True) & (part_x >= 0)[..., None, :])
    score = np.where(valid, new_max, np.inf).reshape(rows, heavy.shape[1], -1)
    best = score.argmin(2)
    improved = np.take_along_axis(score, best[..., None], 2)[..., 0] < heavy_load * (1 - 1e-12)
    p_idx, h_slot, p_slot = np.unravel_index(best, (partner.shape[2], per_rank, per_rank))
    part = np.take_along_axis(partner, p_idx[..., None], 2)[..., 0]
    return improved, heavy, h_slot, part, p_slot


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
    pairs = max(1, _SWAP_PAIR_BUDGET // load.shape[0])
    improve_by_swaps(slots, per_replica, max_steps=swap_steps, pairs=pairs)
    return slots
