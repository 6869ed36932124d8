"""Rank order of a fresh plan: the ranks a scale-down drops first hold what it can spare.

A fresh plan's packs may sit on the ranks in any order (within a node, for a hierarchical plan):
the balancedness is the same. The order decides what a later change loses. A scale-down drops
the highest ranks (``RankMapping.resize``; a node-aligned one the highest of each node), and
every expert whose replicas all sat there must be re-homed: a weight received, or, for a failed
node, a reload from a checkpoint. Packing leaves an expert's replicas on neighbouring ranks (a
hot expert's replicas are the heaviest items of the first rounds), so dropping the top 1/8 of
512 one-slot ranks (64 experts) left 25 of a layer's 64 experts with no replica.

:func:`essential_first` sorts each row's ranks (a layer, or a node of one) by the most
essential replica they hold, descending:

* an expert's *home* (one replica per expert, the only one of a single-replica expert; on a rank
  that holds a single-replica expert where the expert has one there, so that few ranks hold
  homes) is essential: ranks holding one come first, in their old order;
* the j-th other replica of an expert of load ``w`` (j = 1, 2, ...; in rank order) is worth
  ``w / j``, the load per replica the greedy replication saw when it added that replica.

So the highest ranks hold the replicas a smaller world would not have made (with one slot per
rank, dropping the top k ranks undoes the last k steps of the greedy replication), and an
expert loses its last replica only where every rank holds a home (few redundant slots: then
every rank holds a single-replica expert). Cost: two stable 16-bit radix sorts (the slots by
expert, the ranks by the top 16 bits of their float32 worth, which keep it to 1%) and about 15
passes over the slots, linear in L x R x S; the planner orders global plans and one-slot
hierarchical ones (``elastic_ep.eplb.planner.ORDER_MOST_SLOTS`` says why). A one-slot fresh
plan is built in this order at once (:func:`essential_one_slot`): its homes are the experts in
packing order and only its spares are sorted.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.repair_swaps import any_slot
from elastic_ep.eplb.replication import descending_order, replica_counts

_UINT16_MAX = 0xFFFF
SORT_ROWS_AT_ONCE = 32
"""From this many rows of at most ``SHORT_ROW`` keys, :func:`_sort_rows` sorts all rows in two
passes rather than one by one (a hierarchical plan's (layer, node) rows: 26 x 64 experts on
128 one-slot ranks in 8 nodes, 0.18 -> 0.10 ms)."""
SHORT_ROW = 256


def essential_first(slots: np.ndarray, load: np.ndarray, num_nodes: int = 1) -> np.ndarray:
    """int64 [L, R, S]: ``slots`` with each node's ranks reordered, see the module docstring.

    Args:
        slots: int64 [L, R, S], a plan (-1 = empty); with ``num_nodes > 1`` every expert's
            replicas lie in one node of R / N consecutive ranks.
        load: float64 [L, E], non-negative load per expert.
        num_nodes: N, dividing R; ranks move only within their node.
    """
    layers, ranks, per_rank = slots.shape
    experts = load.shape[1]
    per_node = ranks // num_nodes
    rows, width = layers * num_nodes, per_node * per_rank
    local = slots.reshape(rows, per_node, per_rank)
    # Per row, slots sorted by expert, then (several slots per rank) the replica on a rank
    # holding a single first (the home), then by rank: a stable radix sort of 16-bit keys.
    # Small dtypes throughout: temporaries under 128 KiB stay on the heap (larger ones are
    # mapped and page-faulted afresh at every call).
    wide = 2 * experts + 1 > _UINT16_MAX
    if wide:
        expert = local.reshape(rows, width).copy()
        expert[expert < 0] = experts  # an empty slot
    else:
        expert = local.reshape(rows, width).astype(np.uint16)
        np.minimum(expert, experts, out=expert)  # an empty slot (-1 wraps to 65535)
    if per_rank > 1:  # with one slot, a rank holding a single holds no other expert's replica
        group = expert + (np.arange(rows) * (experts + 1))[:, None]
        counts = np.bincount(group.ravel(), minlength=rows * (experts + 1))
        # Where each (row, expert) run starts once the rows are sorted by expert, as a flat
        # index: the sorted slot at flat index i is replica i - start of its expert.
        start = np.cumsum(counts)
        start -= counts
        counts[experts :: experts + 1] = 0  # empty slots hold no single replica
        holds_single = any_slot((counts.take(group) == 1).reshape(rows, per_node, per_rank))
        if holds_single.all():  # every rank holds an expert's only replica: none is spared
            return slots.copy()
        order = _sort_rows(expert * 2 + np.repeat(~holds_single, per_rank, axis=1))
        sorted_group = group.ravel().take(order)
        # Replicas of the expert before, in rank order (homes first).
        nth = np.arange(rows * width).reshape(rows, width)
        nth -= start.take(sorted_group).reshape(rows, width)
        sorted_expert = sorted_group.reshape(rows, width)
        sorted_expert -= (np.arange(rows) * (experts + 1))[:, None]
    else:
        order = _sort_rows(expert)  # flat indices: one ``take`` beats ``take_along_axis``
        sorted_expert = expert.ravel().take(order).reshape(rows, width)
        boundary = sorted_expert[:, 1:] != sorted_expert[:, :-1]
        if boundary.all() and (sorted_expert < experts).all():
            return slots.copy()  # every rank holds an expert's only replica
        nth = _index_in_run(boundary)  # replicas of the expert before, in rank order
    # Worth = load / nth: +inf for a home, negative for an empty slot; float32 is fine for an
    # order.
    padded = np.full((layers, experts + 1), -1.0, dtype=np.float32)
    padded[:, :experts] = _worth_load(load)
    row_base = np.arange(rows) // num_nodes * (experts + 1)
    weight = padded.ravel().take(sorted_expert + row_base[:, None])
    inverse = np.empty(width, dtype=np.float32)  # 1 / nth, +inf for a home
    inverse[0] = np.inf
    inverse[1:] = _inverses(width - 1)
    worth = weight.ravel() * inverse.take(nth.ravel())
    slot_worth = np.empty(rows * width, dtype=np.float32)
    slot_worth[order] = worth
    slot_worth = slot_worth.reshape(rows, per_node, per_rank)
    rank_worth = slot_worth[:, :, 0]
    if per_rank > 1:
        rank_worth = rank_worth.copy()
        for column in range(1, per_rank):  # column maxima: a reduction over a short axis is slower
            np.maximum(rank_worth, slot_worth[:, :, column], out=rank_worth)
    rank_order = _sort_rows(_descending_key(rank_worth))
    return local.reshape(-1, per_rank).take(rank_order, axis=0).reshape(slots.shape)


def essential_one_slot(
    load: np.ndarray, num_ranks: int, ids: np.ndarray | None = None
) -> np.ndarray:
    """int64 [B, R, 1]: the one-slot fresh plan of :func:`elastic_ep.eplb.packing.static_slots`
    with its ranks in :func:`essential_first`'s order, built at once
    (:func:`essential_items`), for ``load`` float64 [B, E] (E <= R); experts written as
    ``ids`` int64 [B, E] where given (a node's experts by their global ids)."""
    counts = replica_counts(load, num_ranks, num_ranks)
    return essential_items(counts, load / counts, load, num_ranks, ids)[:, :, None]


def essential_items(
    counts: np.ndarray,
    per_replica: np.ndarray,
    load: np.ndarray,
    num_items: int,
    ids: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [B, num_items]: a one-slot fresh plan packed as
    :func:`elastic_ep.eplb.packing.sorted_items` packs it (experts by their load per replica,
    descending, each expert's replicas on consecutive ranks), with its ranks already in
    :func:`essential_first`'s order: the same result (for loads below float32's largest),
    built from the counts instead of sorted out of the plan. The homes are the experts in
    packing order; the j-th spare replica of an expert (j >= 1) is worth ``load / j``, and only
    the spares are sorted, one 16-bit key each.

    Args:
        counts: int64 [B, E], replicas per expert, each >= 1, summing to num_items in every
            row (:func:`~elastic_ep.eplb.replication.replica_counts` with one slot per rank).
        per_replica: float64 [B, E], ``load / counts``: the packing's order.
        load: float64 [B, E], non-negative.
        num_items: R, ranks per row.
        ids: int64 [B, E], what to write for each expert (its index where ``None``).
    """
    rows, experts = counts.shape
    homes = descending_order(per_replica)  # [B, E]: the packing's order, one rank each
    flat = (homes + (np.arange(rows) * experts)[:, None]).ravel()
    named = homes.ravel() if ids is None else ids.ravel().take(flat)
    out = np.empty((rows, num_items), dtype=np.int64)
    out[:, :experts] = named.reshape(rows, experts)
    width = num_items - experts  # spares per row
    if width == 0:
        return out
    spares = counts.ravel().take(flat) - 1
    # Per spare, in packing order: its expert, its weight and j - 1, its index among the
    # expert's spares; repeated from the [B, E] arrays in small dtypes (large int64
    # temporaries are mapped and page-faulted afresh at every call).
    small = np.uint16 if int(named.max()) <= _UINT16_MAX else np.int64
    spare_expert = np.repeat(named.astype(small), spares)
    spare_weight = np.repeat(_worth_load(load).ravel().take(flat), spares)
    # j - 1 as a column of the row less where the expert's spares start in the row.
    index = np.int16 if width < 0x7FFF else np.int64
    per_row = spares.reshape(rows, experts)
    start = (np.cumsum(per_row, axis=1) - per_row).astype(index)
    nth = np.empty((rows, width), dtype=index)
    nth[:] = np.arange(width, dtype=index)
    nth = nth.ravel()
    nth -= np.repeat(start.ravel(), spares)
    spare_weight *= _inverses(width).take(nth)  # worth as essential_first has it
    order = _sort_rows(_descending_key(spare_weight).reshape(rows, width))
    out[:, experts:] = spare_expert.take(order).reshape(rows, width)
    return out


def _worth_load(load: np.ndarray) -> np.ndarray:
    """float32 [B, E]: ``load`` float64 [B, E] as the worths start from; the tiny addend keeps a
    zero-load expert's home infinite and its spares positive."""
    weight = load.astype(np.float32)
    weight += np.float32(1e-30)
    return weight


def _inverses(count: int) -> np.ndarray:
    """float32 [count]: 1 / j for j = 1 .. count, the worth of a j-th spare per unit of load."""
    return (1.0 / np.arange(1, count + 1)).astype(np.float32)


def _index_in_run(boundary: np.ndarray) -> np.ndarray:
    """int16 or int64 [B, W]: each entry's index in its run of equal entries, from ``boundary``
    bool [B, W - 1] (True where entry w + 1 starts a new run)."""
    rows, width = boundary.shape[0], boundary.shape[1] + 1
    index = np.int16 if width < 0x7FFF else np.int64
    position = np.arange(width, dtype=index)
    start = np.zeros((rows, width), dtype=index)
    np.multiply(boundary, position[1:], out=start[:, 1:])
    nth = np.maximum.accumulate(start, axis=1)
    return np.subtract(position, nth, out=nth)


def _descending_key(worth: np.ndarray) -> np.ndarray:
    """uint16 [B, W]: a key whose ascending order is ``worth``'s (float32 [B, W], +inf or >= 0,
    or negative for an empty rank) descending, for a radix sort: a positive float32's bit
    pattern orders like the float, and its top 16 bits keep it to 1%; +inf (a home) first, an
    empty rank last."""
    top = (worth.view(np.uint32) >> 16).astype(np.uint16)
    return np.where(worth < 0, np.uint16(_UINT16_MAX), np.uint16(_UINT16_MAX) - top)


def _sort_rows(key: np.ndarray) -> np.ndarray:
    """int64 [B * W]: flat indices that sort each row of ``key`` [B, W] stably. Many short
    rows (a hierarchical plan's (layer, node) rows): two stable 16-bit radix passes over all
    of them, by key then by row (one sort per row costs a call each); else one sort per row."""
    rows, width = key.shape
    short = width <= SHORT_ROW
    if short and rows >= SORT_ROWS_AT_ONCE and key.dtype == np.uint16 and rows <= _UINT16_MAX:
        by_key = np.argsort(key.ravel(), kind="stable")
        row = (by_key // width).astype(np.uint16)
        return by_key.take(np.argsort(row, kind="stable"))
    order = np.argsort(key, axis=1, kind="stable")
    order += (np.arange(rows) * width)[:, None]
    return order.ravel()
