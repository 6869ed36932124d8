"""Movement-aware repair: start from what the ranks already hold and change as little as needed.

Batched over rows (layers, or (layer, node) pairs of a hierarchical plan), on the layout of
:mod:`elastic_ep.eplb.packing`; ``kept`` is the previous placement mapped onto the new ranks.
A row stops once it reaches its target balancedness. With one slot per rank no swap can help:
:mod:`elastic_ep.eplb.single_slot` gives the wanted replica counts with the fewest transfers.

Without routing shares (``most=None``; every replica takes an equal part of its expert's load)
a row gets :func:`~elastic_ep.eplb.incremental.fill_missing` (every replica the wanted counts
ask for) and then :func:`~elastic_ep.eplb.repair_swaps.swap_towards`, a second time with more
partners per heavy rank (R / 4, at most ``WIDE_PARTNERS``) where it is still short.

With shares (``most``: the units an expert may have), a row's balancedness is measured as the
placement gets it: with :func:`~elastic_ep.eplb.shares.solve_shares`'s units, which move load
between replicas of one expert without moving a weight. Each row goes up a ladder of steps and
leaves it at the first that reaches its target:

1. the fewest moves: experts with no replica left, and the empty slots (a joined rank) filled
   with the wanted replicas heaviest first: shares then move load onto them;
2. swaps of slots, each carrying the load its share gives it, so that the swaps aim at the
   ranks still heavy after the shares;
3. the rest of the wanted replicas (over surplus ones), then swaps again, the second time with
   more partners.

Each step costs one :func:`solve_shares` of the rows still on the ladder, about linear in their
slots.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.incremental import fill_missing
from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.repair_swaps import SWAP_PARTNERS, received_count, swap_towards
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.single_slot import repair_single_slot

WIDE_PARTNERS = 64  # partners per heavy rank in the second pass (rows short of their target)
SHARE_ROUNDS = 4  # rounds of swaps by the equal split, each measured with shares after it


def repair(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    counts: np.ndarray | None = None,
    most: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``kept`` repaired for ``load``, see the module docstring.

    Args:
        load: float64 [B, E].
        kept: int64 [B, R, S], what the ranks hold now, no expert twice on one rank.
        target: float64 [B], balancedness at which a row stops (with shares where ``most``).
        budget: int64 [B], most weights received per row (experts without any replica are
            placed regardless).
        counts: int64 [B, E], the replica counts wanted if already known (see
            :func:`elastic_ep.eplb.replication.replica_counts`).
        most: the most routing units an expert may have (``Placement.max_units``); ``None``:
            balancedness with the equal split.

    Returns:
        The slots int64 [B, R, S] and, where ``most`` is given, their routing units int64
        [B, R, S] (:func:`solve_shares`'s), else ``None``.
    """
    _, ranks, per_rank = kept.shape
    if counts is None:
        counts = replica_counts(load, ranks * per_rank, ranks)
    orphans = (expert_counts(kept, load.shape[1]) == 0).sum(1)
    spare = np.maximum(budget - orphans, 0)
    if per_rank == 1:  # no swap helps: a swap of single slots only exchanges two ranks' loads
        slots = repair_single_slot(kept, load, counts, spare)
        return slots, None if most is None else (slots >= 0).astype(np.int64)
    if most is None:
        slots = kept.copy()
        fill_missing(slots, load, counts, spare)
        _swap_passes(slots, kept, load, target, budget, None)
        return slots, None
    return _repair_with_shares(load, kept, target, budget, counts, most)


def _repair_with_shares(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    counts: np.ndarray,
    most: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The ladder of the module docstring; arguments and result as in :func:`repair`."""
    rows, ranks, per_rank = kept.shape
    slots = kept.copy()
    orphans = (expert_counts(kept, load.shape[1]) == 0).sum(1)
    empty = (kept < 0).reshape(rows, -1).sum(1)
    first = np.minimum(np.maximum(empty - orphans, 0), np.maximum(budget - orphans, 0))
    fill_missing(slots, load, counts, first)
    units = solve_shares(slots, load, most)
    balance = balance_with_units(slots, load, units)[0]

    def measure(at: np.ndarray) -> None:
        if at.size == 0:
            return
        units[at] = solve_shares(slots[at], load[at], most)
        balance[at] = balance_with_units(slots[at], load[at], units[at])[0]

    # Step 3: the rest of the wanted replicas, then rounds of swaps by the equal split. Rows
    # that had no empty slot to fill start from ``kept`` again (step 1 placed only the experts
    # without a replica): all replicas placed at once leave the swaps a better start.
    short = np.flatnonzero(balance < target)
    if short.size:
        again = short[first[short] == 0]
        slots[again] = kept[again]
        part = slots[short]
        # Beyond the experts without a replica (placed regardless, again where reset).
        spent = received_count(part, kept[short]) + np.where(first[short] == 0, orphans[short], 0)
        left = np.maximum(budget[short] - spent, 0)
        fill_missing(part, load[short], counts[short], left)
        changed = (part != slots[short]).reshape(short.size, -1).any(1)
        slots[short] = part
        measure(short[changed])
    for _ in range(SHARE_ROUNDS):
        short = short[balance[short] < target[short]]
        if short.size == 0:
            break
        part = slots[short]
        # Swap until the equal split reaches the target less what shares add to it now.
        lift = np.maximum(balance[short] - _balance(part, load[short]), 0.0)
        goal = target[short] - lift
        swap_towards(part, kept[short], load[short], goal, budget[short], ranks * per_rank)
        moved = (part != slots[short]).reshape(short.size, -1).any(1)
        short = short[moved]
        slots[short] = part[moved]
        measure(short)
    # Rows still short: swaps of the loads shares give, then by the equal split to the target.
    for weigh in (True, False):
        short = np.flatnonzero(balance < target)
        if short.size == 0:
            break
        part = slots[short]
        weight = balance_with_units(part, load[short], units[short])[1] if weigh else None
        _swap_passes(part, kept[short], load[short], target[short], budget[short], weight)
        slots[short] = part
        measure(short)
    return slots, units


def shared_balance(
    slots: np.ndarray, load: np.ndarray, most: int, nodes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """float64 [B] balancedness and float64 [B, R, S] slot loads (:func:`balance_with_units`)
    with :func:`node_shares`'s units for ``slots`` int64 [B, R, S] and ``load`` float64
    [B, E], ``most`` units per expert at most."""
    return balance_with_units(slots, load, node_shares(slots, load, most, nodes))


def node_shares(slots: np.ndarray, load: np.ndarray, most: int, nodes: int = 1) -> np.ndarray:
    """int64 [B, R, S]: :func:`solve_shares`'s units for ``slots`` int64 [B, R, S] and ``load``
    float64 [B, E], solved for each node of R / ``nodes`` consecutive ranks on its own (where
    every expert's replicas are on one node, as in a hierarchical plan: each node then lowers
    its own heaviest rank, not only the node holding the row's heaviest)."""
    if nodes == 1:
        return solve_shares(slots, load, most)
    rows, ranks, per_rank = slots.shape
    local = slots.reshape(rows * nodes, ranks // nodes, per_rank)
    units = solve_shares(local, np.repeat(load, nodes, axis=0), most)
    return units.reshape(slots.shape)


def balance_with_units(
    slots: np.ndarray, load: np.ndarray, units: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float64 [B] balancedness (mean / max rank load; 1.0 for a row without load) and float64
    [B, R, S] the load of each slot when the replica in a slot takes ``units`` (int64 [B, R, S],
    0 on empty slots) of its expert's units summed over ``slots`` int64 [B, R, S]; ``load``
    float64 [B, E]."""
    rows, ranks, per_rank = slots.shape
    experts = load.shape[1]
    units = units.reshape(rows, -1)
    group = np.where(slots >= 0, slots, experts).reshape(rows, -1)
    group = group + (np.arange(rows) * (experts + 1))[:, None]
    total = np.bincount(group.ravel(), weights=units.ravel(), minlength=rows * (experts + 1))
    weight = np.zeros((rows, experts + 1))
    weight[:, :experts] = load
    per_unit = weight.ravel() / np.maximum(total, 1)
    slot_weight = (per_unit[group] * units).reshape(rows, ranks, per_rank)
    rank_load = slot_weight.sum(2)
    peak = rank_load.max(1)
    balance = np.where(peak > 0, rank_load.mean(1) / np.maximum(peak, 1e-300), 1.0)
    return balance, slot_weight


def _balance(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [B]: balancedness of every row with the equal split."""
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    rank_load = slot_loads(slots, load / counts).sum(2)
    peak = rank_load.max(1)
    return np.where(peak > 0, rank_load.mean(1) / np.maximum(peak, 1e-300), 1.0)


def _swap_passes(
    slots: np.ndarray,
    kept: np.ndarray,
    load: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    weight: np.ndarray | None,
) -> None:
    """:func:`swap_towards` on ``slots`` in place, then rows still short of their target once
    more with more partners per heavy rank. Slot loads ``weight`` float64 [B, R, S] (the
    balancedness measured with them), or the equal split where ``None``."""
    ranks, per_rank = slots.shape[1:]
    swap_towards(slots, kept, load, target, budget, ranks * per_rank, slot_weight=weight)
    if ranks <= 4 * SWAP_PARTNERS:
        return
    if weight is None:
        short = np.flatnonzero(_balance(slots, load) < target)
    else:  # the loads moved with their slots
        rank_load = weight.sum(2)
        short = np.flatnonzero(rank_load.mean(1) / np.maximum(rank_load.max(1), 1e-300) < target)
    if short.size == 0:
        return
    part = slots[short]
    swap_towards(
        part,
        kept[short],
        load[short],
        target[short],
        budget[short],
        ranks * per_rank,
        partners=min(ranks // 4, WIDE_PARTNERS),
        slot_weight=None if weight is None else weight[short],
    )
    slots[short] = part
