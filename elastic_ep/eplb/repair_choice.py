"""Per layer, the movement-aware repair of a previous placement or the relabelled fresh plan.

:func:`prefer_repair` sets each layer's target from the fresh plan (its balancedness minus the
tolerance, keeping ``RECOVERED`` of its gain over the placement as it is), builds the repair
(:mod:`elastic_ep.eplb.repair`; per node for hierarchical plans) and keeps it where it reaches
the target; elsewhere the fresh plan relabelled onto the old ranks (:mod:`elastic_ep.eplb.relabel`),
unless the repair is a near miss and the fresh plan would move over ``NEAR_MISS_MOVES`` times its
weights. Balancedness is measured with routing shares where the plan has them.
:func:`single_slot_repair` is the one-slot shortcut that needs no fresh plan. The rules are
described in :mod:`elastic_ep.eplb.planner` and docs/planner.md.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.hierarchical import repair_within_nodes
from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.relabel import align_slots, overlap_edges, relabel_packs
from elastic_ep.eplb.repair import balance_with_units, node_shares, repair
from elastic_ep.eplb.repair_swaps import received_count
from elastic_ep.eplb.single_slot import repair_single_slot

RECOVERED = 0.9
"""Share of the fresh plan's balancedness gain over the previous placement a repair keeps."""
NEAR_MISS_MOVES = 2
"""A repair short of its target by less than the tolerance is kept where the relabelled fresh
plan would move more than this many times its weights."""


def single_slot_repair(
    load: np.ndarray,
    kept: np.ndarray,
    max_transfers: int | None,
    groups: int,
    nodes: int,
    counts: np.ndarray | None,
) -> np.ndarray | None:
    """int64 [L, R, 1]: the repair of a one-slot placement where it has the fresh plan's
    replica counts, hence its balancedness (which depends on the counts alone), so that no
    fresh plan is needed; ``None`` where that does not hold (a transfer budget, several groups
    per node, or a previous placement that gives some node no group of its own)."""
    layers, ranks, per_rank = kept.shape
    if per_rank != 1 or max_transfers is not None:
        return None
    if nodes == 1:
        assert counts is not None
        return repair_single_slot(kept, load, counts, np.full(layers, ranks))
    if groups != nodes:  # node loads then depend on which groups share a node
        return None
    budget = np.full(layers, ranks)
    repaired, _, usable = repair_within_nodes(load, kept, np.zeros(layers), budget, groups, nodes)
    return repaired if usable.all() else None


def prefer_repair(
    load: np.ndarray,
    fresh: np.ndarray,
    previous: tuple[np.ndarray, np.ndarray],
    max_transfers: int | None,
    tolerance: float,
    layout: tuple[int, int],
    counts: np.ndarray | None,
    most: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per layer, the repair of ``kept`` or ``fresh`` (see :mod:`elastic_ep.eplb.planner`).

    Args:
        load: float64 [L, E]. fresh: int64 [L, R, S], the fresh plan.
        previous: ``kept`` int64 [L, R, S] and its balancedness float64 [L] as the ranks
            route now.
        max_transfers, tolerance: as in :func:`plan`. layout: (groups, nodes).
        counts: int64 [L, E], the global plan's replica counts (``None`` for hierarchical).
        most: balancedness with routing shares of at most ``most`` units per expert (solved
            per node, :func:`elastic_ep.eplb.repair.node_shares`), or the equal split where
            ``None``.

    Returns:
        The chosen slots int64 [L, R, S], bool [L] (True where repaired) and the chosen
        slots' routing units int64 [L, R, S] (``None`` without shares).
    """
    kept, kept_balance = previous
    layers, ranks, slots = kept.shape
    groups, nodes = layout
    limit = ranks * slots if max_transfers is None else max_transfers

    if most is None:
        fresh_balance = layer_balancedness(fresh, load)
    else:
        fresh_balance = balance_with_units(fresh, load, node_shares(fresh, load, most, nodes))[0]
    target = layer_targets(fresh_balance, kept_balance, tolerance)
    budget = np.full(layers, limit)
    if nodes == 1:
        repaired, units = repair(load, kept, target, budget, counts, most)
        usable = np.ones(layers, dtype=bool)
    else:
        repaired, units, usable = repair_within_nodes(
            load, kept, target, budget, groups, nodes, most
        )
    repair_cost = received_count(repaired, kept)
    usable &= repair_cost <= limit
    if units is None:
        repair_balance = layer_balancedness(repaired, load)
    else:
        repair_balance = balance_with_units(repaired, load, units)[0]
    good_enough = usable & (repair_balance >= target - 1e-12)
    near = usable & (repair_balance >= target - tolerance)
    chosen, use_repair = repaired, good_enough.copy()
    # The relabelled fresh plan (an assignment per layer) only where the repair misses its
    # target: where the repair reaches it, it moves fewer weights (tests/test_planner_elastic.py).
    contest = np.flatnonzero(~good_enough)
    if contest.size:
        packs, before = fresh[contest], kept[contest]
        relabelled = align_slots(relabel_packs(packs, overlap_edges(packs, before), nodes), before)
        fresh_cost = received_count(relabelled, before)
        keep_repair = usable[contest] & (fresh_cost > limit)
        # A repair short of its target by less than `tolerance` stays when the fresh plan
        # would move over twice its weights (with few slots per rank, a fresh plan's packs
        # share little with the old ranks).
        keep_repair |= near[contest] & (fresh_cost > NEAR_MISS_MOVES * repair_cost[contest])
        over = np.flatnonzero(~keep_repair & (fresh_cost > limit))
        if over.size:
            raise ValueError(
                f"max_transfers={max_transfers} cannot be met in layer {int(contest[over[0]])}: "
                f"the previous placement does not keep expert groups within nodes"
            )
        chosen = repaired.copy()
        chosen[contest] = np.where(keep_repair[:, None, None], repaired[contest], relabelled)
        use_repair[contest] = keep_repair
        taken = contest[~keep_repair]
        if units is not None and most is not None and taken.size:
            units[taken] = node_shares(chosen[taken], load[taken], most, nodes)
    return chosen, use_repair, units


def layer_targets(fresh: np.ndarray, kept: np.ndarray, tolerance: float) -> np.ndarray:
    """float64 [L]: the balancedness each layer's repair aims for, from the fresh plan's
    ``fresh`` and the placement's as it is, ``kept`` (both float64 [L]).

    Within ``tolerance`` of the fresh plan; where the fresh plan gains more than that over
    leaving the layer as it is, also ``RECOVERED`` of that gain. Where the whole model gains
    more than ``tolerance`` (the mean of the layers' gains, as balancedness is a mean over
    layers), every layer that gains keeps ``RECOVERED`` of its gain, however small: many
    layers each gaining a little (a hierarchical plan on many ranks, where node loads set the
    heaviest rank) would otherwise all stay as they are and the model lose its whole gain.
    """
    gain = fresh - kept
    floor = 0.0 if gain.mean() > tolerance else tolerance
    shortfall = np.where(gain > floor, (1.0 - RECOVERED) * gain, tolerance)
    return fresh - np.minimum(tolerance, shortfall)


def layer_balancedness(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [L]: mean / max rank load per layer (1.0 for a layer without load)."""
    counts = expert_counts(slots, load.shape[1])
    rank_load = slot_loads(slots, load / np.maximum(counts, 1)).sum(2)
    peak = rank_load.max(1)
    return np.where(peak > 0, rank_load.mean(1) / np.maximum(peak, 1e-300), 1.0)
