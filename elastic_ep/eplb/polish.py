"""Re-pack a fresh plan that sets a movement-aware plan's target, where its rounds got stuck.

A fresh plan (:func:`elastic_ep.eplb.packing.static_slots`) deals replicas in rounds of R, one
per rank, then swaps each heavy rank's slots with its counterpart among the lightest ranks. With
three or more slots per rank and a replica near the mean rank load (a hot expert that the slots
cannot split further), the rounds give that replica's rank one item of every later round, not
the smallest ones, and the lightest ranks hold only middling items, so no swap with them helps:
the plan stops short (58 x 256 experts on 56 x 5 slots: 0.835 where vLLM's greedy reaches
0.856). The movement-aware plan aims at the fresh plan's balancedness, so it would stop short
too.

:func:`repack_stuck` re-packs such rows with the greedy that fills the lightest rank with room
(replicas heaviest first, no expert twice on a rank): the heavy ranks fill last, with the
smallest items. A row is re-packed only where

* it has 3 or more slots per rank (with 2, the rounds pair heaviest with lightest already),
* its balancedness is below ``POLISH_BELOW`` (of the heaviest node's mean, for a node row),
* its heaviest rank is over ``1 + POLISH_MARGIN`` times a lower bound on any packing's heaviest
  rank (the mean; the largest item with the S - 1 smallest; the R-th and (R+1)-th largest,
  which share a rank, with the S - 2 smallest),

and keeps the re-packing only where it lowers the heaviest rank. The greedy takes R * S steps,
each over the row's R ranks (all gated rows at once): the gates keep it to the rows it helps,
few and small at many ranks.

:func:`balance_bound` turns that bound into the most balancedness any packing of a plan's
replicas reaches (2+ slots per rank): a scale-down's target is lifted no further than that
(:mod:`elastic_ep.eplb.repair_choice`).
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.packing import expert_counts, slot_loads

POLISH_BELOW = 0.95
"""Rows at or above this balancedness (of their floor) are left as they are."""
POLISH_MARGIN = 0.01
"""Rows within this fraction of the lower bound on their heaviest rank are left as they are."""


def repack_stuck(slots: np.ndarray, load: np.ndarray, num_nodes: int = 1) -> np.ndarray:
    """bool [L]: the layers of ``slots`` (modified in place) re-packed, where a row's heaviest
    rank fell.

    A row is a layer, or a node of a layer's R / N consecutive ranks when ``num_nodes > 1``
    (re-packed within the node, so every expert stays on its node).

    Args:
        slots: int64 [L, R, S], a plan with no expert twice on one rank (-1 = empty).
        load: float64 [L, E], the load per expert; each replica takes an equal part.
        num_nodes: N, dividing R.
    """
    layers, ranks, per_rank = slots.shape
    per_node = ranks // num_nodes
    improved = np.zeros(layers, dtype=bool)
    if per_rank < 3 or per_node < 2:
        return improved
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    weight = slot_loads(slots, load / counts).reshape(layers * num_nodes, per_node, per_rank)
    rank_load = weight.sum(2)
    heaviest = rank_load.max(1)
    # No rank of a layer can fall under the heaviest node's mean rank load.
    floor = np.repeat(rank_load.mean(1).reshape(layers, num_nodes).max(1), num_nodes)
    stuck = (heaviest * POLISH_BELOW > floor) & (
        heaviest > (1 + POLISH_MARGIN) * heaviest_bound(weight)
    )
    rows = np.flatnonzero(stuck)
    if rows.size == 0:
        return improved
    local = slots.reshape(layers * num_nodes, per_node, per_rank)
    packed, packed_load, complete = greedy_pack(local[rows], weight[rows])
    better = complete & (packed_load.max(1) < heaviest[rows] * (1 - 1e-12))
    local[rows[better]] = packed[better]
    slots[...] = local.reshape(slots.shape)  # a no-op where the reshape was a view
    improved[rows[better] // num_nodes] = True
    return improved


def balance_bound(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [L]: the most balancedness any packing of the replicas of ``slots`` (int64
    [L, R, S], S >= 2) reaches for ``load`` (float64 [L, E]) with the equal split: mean rank
    load over :func:`heaviest_bound` (1.0 for a layer without load)."""
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    weight = slot_loads(slots, load / counts)
    bound = heaviest_bound(weight)
    mean = weight.sum((1, 2)) / slots.shape[1]
    return np.where(bound > 0, mean / np.maximum(bound, 1e-300), 1.0)


def heaviest_bound(weight: np.ndarray) -> np.ndarray:
    """float64 [B]: a lower bound on the heaviest rank of any packing of the items ``weight``
    float64 [B, R, S] (S >= 2) with S per rank (module docstring)."""
    rows, ranks, per_rank = weight.shape
    items = np.sort(weight.reshape(rows, -1), axis=1)  # lightest first
    smallest = items[:, : per_rank - 1].sum(1)
    alone = items[:, -1] + smallest
    paired = items[:, -ranks] + items[:, -ranks - 1] + smallest - items[:, per_rank - 2]
    return np.maximum(np.maximum(alone, paired), items.sum(1) / ranks)


def greedy_pack(slots: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The items of every row re-packed heaviest first, each to the lightest rank with room
    that lacks its expert (vLLM's ``balanced_packing`` with distinct experts per rank).

    Args:
        slots: int64 [B, R, S], expert per slot (-1 = empty; empty slots stay empty).
        weight: float64 [B, R, S], the load of every slot (replicas of an expert equal).

    Returns:
        The re-packed slots int64 [B, R, S], rank loads float64 [B, R] and bool [B]: False
        where a replica found no rank with room lacking its expert (that row is unusable).
    """
    rows, ranks, per_rank = slots.shape
    expert = slots.reshape(rows, -1)
    load = weight.reshape(rows, -1)
    # Heaviest first, replicas of an expert adjacent (equal loads sort by expert), empty last:
    # one stable sort of complex keys (by real, then imaginary part), a lexsort's order.
    by_weight = np.empty(expert.shape, dtype=np.complex128)
    by_weight.real = -np.where(expert >= 0, load, -1.0)
    by_weight.imag = expert
    order = by_weight.argsort(axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, 1)
    load = np.take_along_axis(load, order, 1)
    # The first R items go one to each rank, in order (every rank is empty and lacks them).
    out = np.full((rows, ranks, per_rank), -1, dtype=np.int64)
    out[:, :, 0] = expert[:, :ranks]
    rank_load = load[:, :ranks].copy()
    filled = (expert[:, :ranks] >= 0).astype(np.int64)
    # The last expert each rank received: replicas of an expert are adjacent in the order, so
    # a rank holds the current item's expert exactly where it is the last one it received.
    last = expert[:, :ranks].copy()
    # Each rank's load where it has room, +inf where full, kept up to date with every item.
    room_load = np.where(filled >= per_rank, np.inf, rank_load)
    flat_out, flat_load = out.reshape(-1), rank_load.reshape(-1)
    flat_filled, flat_last = filled.reshape(-1), last.reshape(-1)
    flat_room = room_load.reshape(-1)
    # Item by item, each column's items of all rows contiguous.
    items, item_load = expert.T.copy(), load.T.copy()
    live: np.ndarray = items >= 0
    every_live = np.logical_and.reduce(live, axis=1)
    complete = np.ones(rows, dtype=bool)
    base = np.arange(rows) * ranks
    for i in range(ranks, items.shape[0]):
        item, item_w = items[i], item_load[i]
        at = room_load.argmin(1) + base
        best = flat_room[at]
        # Where the lightest rank with room holds the item's expert, the lightest without it
        # (elsewhere the first lightest rank is the first lightest one lacking it).
        clash = np.flatnonzero(flat_last[at] == item)
        if clash.size:
            key = room_load[clash]
            key[last[clash] == item[clash, None]] = np.inf
            lightest = key.argmin(1)
            at[clash] = lightest + base[clash]
            best[clash] = key[np.arange(clash.size), lightest]
        if not (every_live[i] and best.max() < np.inf):  # a row with no item or no room
            fits: np.ndarray = best < np.inf
            complete &= fits | ~live[i]
            fits &= live[i]
            at, item, item_w = at[fits], item[fits], item_w[fits]
        flat_out[at * per_rank + flat_filled[at]] = item
        flat_load[at] += item_w
        flat_filled[at] += 1
        flat_last[at] = item
        flat_room[at] = np.where(flat_filled[at] < per_rank, flat_load[at], np.inf)
    return out, rank_load, complete
