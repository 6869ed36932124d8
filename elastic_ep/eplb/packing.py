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

_SWAP_PARTNERS = 1  # swap with the lightest rank only: most of the gain at a fraction of the cost


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
    loads = np.zeros((rows, num_ranks))
    row_idx = np.arange(rows)[:, None]
    for k in range(slots_per_rank):
        target = np.argsort(loads, axis=1, kind="stable")
        if k:
            _avoid_second_replica(target, loads, chunks[:, k], chunks[:, k - 1], targets[:, k - 1])
        targets[:, k] = target
        loads[row_idx, target] += weight[:, k]
    slots = np.empty((rows, num_ranks, slots_per_rank), dtype=np.int64)
    slots[row_idx[:, :, None], targets.transpose(0, 2, 1), np.arange(slots_per_rank)] = (
        chunks.transpose(0, 2, 1)
    )
    return slots


def _avoid_second_replica(
    target: np.ndarray,
    loads: np.ndarray,
    chunk: np.ndarray,
    last: np.ndarray,
    last_target: np.ndarray,
) -> None:
    """Fix ``target`` [B, R] (ranks by load, for this round's items) in place where this round's
    first expert also ended the previous round (``last``, dealt to ``last_target``).

    Replicas of one expert are adjacent in the item order, so that is the only way a rank could
    get a second replica. Those replicas (the first items) then take the lightest ranks that
    lack the expert (there are enough: an expert has at most R replicas); the other items take
    the remaining ranks by load.
    """
    first = chunk[:, :1]
    straddle = np.flatnonzero((last[:, -1:] == first)[:, 0] & (first[:, 0] >= 0))
    if straddle.size == 0:
        return
    rows = np.arange(straddle.size)[:, None]
    loads, chunk, first = loads[straddle], chunk[straddle], first[straddle]
    has_first = np.zeros(chunk.shape, dtype=bool)
    has_first[rows, last_target[straddle]] = last[straddle] == first
    span = (chunk == first).sum(1, keepdims=True)
    ceiling = loads.max(1, keepdims=True) + 1.0
    lacking_first = np.argsort(loads + ceiling * has_first, axis=1, kind="stable")
    chosen = np.zeros(chunk.shape, dtype=bool)
    chosen[rows, lacking_first] = np.arange(chunk.shape[1])[None, :] < span
    target[straddle] = np.argsort(loads + ceiling * ~chosen, axis=1, kind="stable")


def presence_of(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, R, E + 1]: copies of each expert on each rank; column 0 counts empty slots."""
    rows, ranks, _ = slots.shape
    cell = np.arange(rows * ranks).reshape(rows, ranks, 1) * (num_experts + 1)
    flat = np.bincount((cell + slots + 1).ravel(), minlength=rows * ranks * (num_experts + 1))
    return flat.reshape(rows, ranks, num_experts + 1)


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
    ranks = slots.shape[1]
    partners = ranks if partner_ranks is None else min(partner_ranks, ranks)
    weight = slot_loads(slots, per_replica)
    active = np.arange(slots.shape[0])
    for _ in range(max_steps):
        if active.size == 0:
            return
        improved, heavy, h_slot, partner, p_slot = _best_swaps(
            slots[active], weight[active], partners
        )
        active = active[improved]
        heavy, h_slot, partner, p_slot = (x[improved] for x in (heavy, h_slot, partner, p_slot))
        for table in (slots, weight):
            a, b = table[active, heavy, h_slot], table[active, partner, p_slot]
            table[active, heavy, h_slot], table[active, partner, p_slot] = b, a


def _best_swaps(slots: np.ndarray, weight: np.ndarray, partners: int) -> tuple[np.ndarray, ...]:
    """Best swap per row: (improved [B] bool, heavy rank, heavy slot, partner rank, partner slot)."""
    rows, ranks, per_rank = slots.shape
    row_idx = np.arange(rows)
    loads = weight.sum(2)
    heavy = loads.argmax(1)
    if partners == 1:
        partner = loads.argmin(1)[:, None]
    elif partners < ranks:
        partner = np.argpartition(loads, partners - 1, axis=1)[:, :partners]
    else:
        partner = np.broadcast_to(np.arange(ranks), (rows, ranks))
    heavy_x = slots[row_idx, heavy]  # [B, S]
    part_x = slots[row_idx[:, None], partner]  # [B, M, S]
    heavy_load = loads[row_idx, heavy]
    delta = weight[row_idx, heavy][:, :, None, None] - weight[row_idx[:, None], partner][:, None]
    new_max = np.maximum(
        heavy_load[:, None, None, None] - delta,
        loads[row_idx[:, None], partner][:, None, :, None] + delta,
    )
    same = heavy_x[:, :, None, None] == part_x[:, None, :, :]  # [B, S, M, S]
    # the heavy item must be new to the partner rank and the partner item new to the heavy rank
    valid = (delta > 0) & ~(same.any(3) & (heavy_x >= 0)[:, :, None])[:, :, :, None]
    valid &= ~(same.any(1) & (part_x >= 0))[:, None]
    valid &= (partner != heavy[:, None])[:, None, :, None]
    score = np.where(valid, new_max, np.inf).reshape(rows, -1)
    best = score.argmin(1)
    improved = score[row_idx, best] < heavy_load * (1 - 1e-12)
    h_slot, p_idx, p_slot = np.unravel_index(best, (per_rank, partner.shape[1], per_rank))
    return improved, heavy, h_slot, partner[row_idx, p_idx], p_slot


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
