"""Repair with one slot per rank: keep what the new replica counts allow, fill the rest.

With S = 1 a rank's load is its one replica's, ``load[e] / counts[e]``, so a placement's
balancedness depends on the replica counts alone, never on which rank holds which replica. The
cheapest placement with the wanted counts keeps ``min(have, want)`` replicas of every expert
where they are and puts each missing replica into a freed slot: an empty one (a joined rank)
or one holding a surplus replica. That receives exactly ``sum(max(want - have, 0))`` weights, the
fewest any placement with those counts can, and costs a few sorts of the layer's slots (linear
in L x R up to a log), where the general repair of :mod:`elastic_ep.eplb.incremental` loops over
chunks of replicas.

With a transfer budget (``max_transfers``) the missing replicas go in priority order: experts
with no replica first (always placed), then the replica that lowers its expert's load per
replica the most; surplus replicas are evicted lowest load per replica after eviction first, and
empty slots are used before any eviction. Slots the budget does not reach keep their replica
(or stay empty).
"""

from __future__ import annotations

import numpy as np


def _nth_of_kind(experts: np.ndarray) -> np.ndarray:
    """int64 [B, R]: for every entry of ``experts`` (int64 [B, R], >= -1), how many earlier
    entries of its row hold the same value (0 for the first); one integer sort per row of
    (value, position) pairs."""
    width = experts.shape[1]
    packed = np.sort((experts + 1) * width + np.arange(width), axis=1)
    position = np.arange(width)
    # Where each run of one value starts, carried forward along the row.
    start = np.ones(packed.shape, dtype=bool)
    start[:, 1:] = packed[:, 1:] // width != packed[:, :-1] // width
    first = np.maximum.accumulate(np.where(start, position, 0), axis=1)
    out = np.empty(packed.shape, dtype=np.int64)
    np.put_along_axis(out, packed % width, position - first, axis=1)
    return out


def repair_single_slot(
    kept: np.ndarray, load: np.ndarray, counts: np.ndarray, budget: np.ndarray
) -> np.ndarray:
    """int64 [B, R, 1]: ``kept`` changed to hold ``counts`` replicas per expert, see the module
    docstring.

    Args:
        kept: int64 [B, R, 1], what each rank holds now (-1 = empty).
        load: float64 [B, E], non-negative.
        counts: int64 [B, E] >= 1, the wanted replica counts, each row summing to at most R.
        budget: int64 [B], transfers allowed beyond the experts with no replica left.
    """
    rows, ranks, _ = kept.shape
    experts = load.shape[1]
    flat = kept.reshape(rows, ranks)
    row_of = np.repeat(np.arange(rows), ranks)
    key = row_of * experts + np.maximum(flat.ravel(), 0)
    held = flat.ravel() >= 0
    have = np.bincount(key[held], minlength=rows * experts)
    want = counts.ravel()
    # Replicas past the wanted count of their expert (the nth replica, counted in slot order,
    # is surplus from nth = want on).
    over = held & (have > want)[key]
    nth = _nth_of_kind(np.where(over.reshape(rows, ranks), flat, -1)).ravel()
    surplus = np.flatnonzero(over & (nth >= want[key]))
    # Freed slots in order of use: empty ones, then surplus replicas by the load per replica
    # their expert keeps after the eviction (the nth replica leaves nth of them).
    evict_after = np.zeros(key.size)
    evict_after[surplus] = load.ravel()[key[surplus]] / nth[surplus]
    free = np.flatnonzero(~held)
    free = np.concatenate([free, surplus])
    slot_order = free[np.lexsort((evict_after[free], held[free], row_of[free]))]
    # Missing replicas: the (have + m)-th replica of expert e lowers its load per replica
    # from load / (have + m) (orphans: infinite, first).
    deficit = np.maximum(want - have, 0)
    item_key = np.repeat(np.arange(rows * experts), deficit)
    m = np.arange(item_key.size) - np.repeat(np.cumsum(deficit) - deficit, deficit)
    priority = load.ravel()[item_key] / np.maximum(have[item_key] + m, 1)
    orphan = (have[item_key] == 0) & (m == 0)
    item_row = item_key // experts
    item_order = np.lexsort((-priority, ~orphan, item_row))
    item_key, orphan, item_row = item_key[item_order], orphan[item_order], item_row[item_order]
    # The j-th item of a row goes to the row's j-th freed slot, while the budget lasts.
    items = np.bincount(item_row, minlength=rows)
    item_nth = np.arange(item_key.size) - np.repeat(np.cumsum(items) - items, items)
    orphans = np.bincount(item_row[orphan], minlength=rows)
    placed = item_nth < (orphans + np.maximum(budget, 0))[item_row]
    # Freed slots per row are at least the items (counts sum to at most R): the j-th item of
    # a row takes the row's j-th freed slot.
    per_row = np.bincount(row_of[slot_order], minlength=rows)
    first_slot = np.cumsum(per_row) - per_row
    target = slot_order[first_slot[item_row] + item_nth]
    out = flat.ravel().copy()
    out[target[placed]] = item_key[placed] % experts
    # Freed slots no item reached: surplus replicas stay; empty ones stay empty.
    return out.reshape(rows, ranks, 1)
