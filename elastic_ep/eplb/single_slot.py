"""Repair with one slot per rank: keep what the new replica counts allow, fill the rest.

With S = 1 a rank's load is its one replica's, ``load[e] / counts[e]``, so a placement's
balancedness depends on the replica counts alone, never on which rank holds which replica. The
cheapest placement with the wanted counts keeps ``min(have, want)`` replicas of every expert
where they are and puts each missing replica into a freed slot: an empty one (a joined rank)
or one holding a surplus replica. That receives exactly ``sum(max(want - have, 0))`` weights, the
fewest any placement with those counts can. The surplus replicas of an expert are its last ones
in slot order: one stable sort of the slots of experts with a surplus (16-bit keys, a radix
sort). Where the counts fill every slot and the budget reaches every missing replica, every
freed slot receives one and the missing replicas go in slot order; where nothing is missing
(a drift whose counts did not change) the placement stays as it is.

With a transfer budget (``max_transfers``) the missing replicas go in priority order: experts
with no replica first (always placed), then the replica that lowers its expert's load per
replica the most; surplus replicas are evicted lowest load per replica after eviction first, and
empty slots are used before any eviction. Slots the budget does not reach keep their replica
(or stay empty).
"""

from __future__ import annotations

import numpy as np


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
    flat = kept.ravel()
    # (row, expert) of every slot, flat; empty slots share the extra key B * E.
    key = np.where(flat >= 0, flat + np.arange(rows).repeat(ranks) * experts, rows * experts)
    have = np.bincount(key, minlength=rows * experts + 1)[:-1]
    want = counts.ravel()
    deficit = np.maximum(want - have, 0)
    if not deficit.any():  # every wanted replica is there: nothing is received (a drift, mostly)
        return kept.copy()
    surplus, nth = _surplus(key, have, want)
    out = flat.copy()
    row_items = deficit.reshape(rows, experts).sum(1)
    orphans = (have == 0).reshape(rows, experts).sum(1)
    if (counts.sum(1) == ranks).all() and (row_items <= orphans + budget).all():
        # Every freed slot receives a missing replica (freed = items + R - sum(counts)): which
        # one changes neither the moves nor the counts, so they go in slot order.
        free = key == rows * experts
        free[surplus] = True
        out[free] = np.tile(np.arange(experts), rows).repeat(deficit)
        return out.reshape(rows, ranks, 1)
    # Freed slots of each row in order of use: empty ones (slot order), then surplus replicas
    # by the load per replica their expert keeps after the eviction (then slot order). Both
    # runs are sorted by row, so the stable sort by row merges two runs.
    by_slot = np.argsort(surplus)
    surplus, nth = surplus[by_slot], nth[by_slot]
    evict_after = load.ravel()[key[surplus]] / nth
    surplus = surplus[_by_row(np.argsort(evict_after, kind="stable"), surplus // ranks, rows)]
    free = np.concatenate([np.flatnonzero(key == rows * experts), surplus])
    free_row = free // ranks
    free = free[np.argsort(free_row, kind="stable")]
    per_row = np.bincount(free_row, minlength=rows)
    item_key = _items_by_priority(have, deficit, load.ravel(), experts)
    # The j-th item of a row takes the row's j-th freed slot (freed slots per row are at least
    # the items: counts sum to at most R), while the budget lasts.
    item_row = item_key // experts
    item_nth = np.arange(item_key.size) - (np.cumsum(row_items) - row_items)[item_row]
    target = free[(np.cumsum(per_row) - per_row)[item_row] + item_nth]
    placed = item_nth < (orphans + np.maximum(budget, 0))[item_row]
    out[target[placed]] = item_key[placed] % experts
    # Freed slots no item reached: surplus replicas stay; empty ones stay empty.
    return out.reshape(rows, ranks, 1)


def _items_by_priority(
    have: np.ndarray, deficit: np.ndarray, load: np.ndarray, experts: int
) -> np.ndarray:
    """int64 [K]: the missing replicas as row * E + expert, in order of placement: by row, the experts with no replica first, then
    by how much the replica lowers its expert's load per replica (the (have + m)-th replica
    lowers it from load / (have + m)).

    Args:
        have, deficit: int64 [B * E], replicas held and missing. load: float64 [B * E].
    """
    item_key = np.arange(have.size).repeat(deficit)
    item_have = have[item_key]
    m = np.arange(item_key.size) - (np.cumsum(deficit) - deficit)[item_key]
    priority = load[item_key] / np.maximum(item_have + m, 1)
    orphan = (item_have == 0) & (m == 0)
    rows = have.size // experts
    order = _by_row(
        np.argsort(-priority, kind="stable"), item_key // experts * 2 + ~orphan, 2 * rows
    )
    return item_key[order]


def _surplus(key: np.ndarray, have: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The surplus replicas, int64 [K] flat slot indices (grouped by expert), and int64 [K]
    how many replicas their expert keeps after each one's eviction.

    The nth replica of an expert (counted in slot order from 0) is surplus from nth = want on,
    and leaves nth replicas behind. Only slots of experts with a surplus are sorted.

    Args:
        key: int64 [B * R], row * E + expert of each slot (B * E for an empty one).
        have, want: int64 [B * E], replicas held and wanted.
    """
    excess = np.where(have > want, have, 0)
    over = np.flatnonzero(np.append(excess > 0, False)[key])
    order = _by_row(np.arange(over.size), key[over], have.size)  # by expert, then slot
    over = over[order]
    sorted_key = key[over]
    # Position within each expert's run: all its `have` replicas are in `over`.
    nth = np.arange(over.size) - (np.cumsum(excess) - excess)[sorted_key]
    cut = nth >= want[sorted_key]
    return over[cut], nth[cut]


def _by_row(order: np.ndarray, row: np.ndarray, rows: int) -> np.ndarray:
    """int64 [K]: ``order`` (int64 [K], a permutation) stably sorted by ``row`` (int64 [K] in
    [0, rows)) of its entries: the order by row, then by ``order``. Below 2**16 rows the keys
    are 16-bit, where a stable sort is a radix sort (several times faster than int64's)."""
    key = row[order]
    if rows <= 1 << 16:
        key = key.astype(np.uint16)
    return order[np.argsort(key, kind="stable")]
