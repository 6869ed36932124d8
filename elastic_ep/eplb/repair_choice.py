"""Per layer, the movement-aware repair of a previous placement or the relabelled fresh plan.

:func:`prefer_repair` sets each layer's target from the fresh plan (:func:`layer_targets`: its
balancedness minus the tolerance, keeping ``RECOVERED`` of its gain over the placement as it
is; a scale-down's target stays :func:`packing_lift` above that, or with 2 slots per rank up
to :func:`pairing_balance`, as another planner's plan may beat the fresh one), builds the
repair (:mod:`elastic_ep.eplb.repair`; per node for hierarchical plans) and keeps it where it
reaches the target; elsewhere the fresh plan relabelled onto the old ranks
(:mod:`elastic_ep.eplb.relabel`; in a hierarchical plan only on the nodes whose repair misses,
:func:`mix_nodes`), unless the repair is a near miss and the fresh plan would move over
``NEAR_MISS_MOVES`` times its weights, or the other
layers' balancedness over their targets pays for the miss (:func:`spend_surplus`: the model's
balancedness is the mean over layers). Balancedness is measured with routing shares where the
plan has them. :func:`single_slot_repair` is the one-slot shortcut that needs no fresh plan.
The rules are described in :mod:`elastic_ep.eplb.planner` and docs/planner.md.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.hierarchical import repair_within_nodes
from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.polish import balance_bound
from elastic_ep.eplb.relabel import align_slots, overlap_edges, relabel_packs
from elastic_ep.eplb.repair import repair
from elastic_ep.eplb.repair_swaps import received_count
from elastic_ep.eplb.single_slot import repair_single_slot
from elastic_ep.eplb.unit_balance import balance_with_units, equal_split_balance, node_shares

RECOVERED = 0.9
"""Share of the fresh plan's balancedness gain over the previous placement a repair keeps."""
PACKING_SLACK = 0.4
"""Share of the tolerance by which another planner's plan at the new size may beat the fresh
plan's equal split (60 x 384 experts on 224 x 3 slots); a repair that stops at the tolerance
under the fresh plan would land under vLLM's less it (:func:`packing_lift`). More (0.6) costs
a third of the speed of other scale-downs. With 2 slots per rank (global plans) the lift is
exact instead: up to :func:`pairing_balance`."""
LIFT_MOST_SLOTS = 3
"""Most slots per rank at which a scale-down's target is lifted: with few slots, one replica of
an expert per rank costs the fresh plan packing freedom that a planner putting two on a rank
has; with more, the fresh plan is at or above vLLM's in the sweep and a lift only costs swaps."""
SURPLUS_KEPT = 0.3
"""Share of the tolerance the model keeps above its layers' mean target when layers whose
repair misses its target keep it (:func:`spend_surplus`): vLLM's plan may beat the fresh one."""
SURPLUS_MOST_LOSS = 4
"""A layer kept by the surplus stays within this many tolerances of its fresh plan: the model's
mean pays for it, the layer itself is never far off."""
LIFT_GAIN = 0.25
"""Gain of the fresh plan over the placement above which a scale-down's target is lifted."""
SCALE_UP_MOVES = 2
"""A scale-up's repair (3+ slots per rank) receives at most this many times the weights that
filling its joined slots and placing its lost experts needs: past that its swaps exchange
slots already received, which costs no further weight (60 x 384 experts on 128 -> 144 x 3:
24.1% -> 21.8% of the slots moved, vLLM - 0.0094 -> - 0.0073). With 2 slots per rank the old
pairs that hold no expert gaining replicas keep their load while the mean falls, so re-pairing
them needs more: a repair held to this misses its target and the fresh plan moves far more."""
NEAR_MISS_MOVES = 2
"""A repair short of its target by the whole tolerance is kept where the relabelled fresh plan
would move more than this many times its weights; one short by a part x of it, where the fresh
plan would move more than 1 + x (``NEAR_MISS_MOVES`` - 1) times: a miss far under the
tolerance is not worth many more weights (26 x 64 experts on 16 x 9 slots, 2 nodes, a drift:
a layer 0.00004 short took the fresh plan's 89 weights over the repair's 54)."""


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
            per node, :func:`elastic_ep.eplb.unit_balance.node_shares`), or the equal split where
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
        fresh_balance = equal_split_balance(fresh, load)
    else:
        fresh_balance = balance_with_units(fresh, load, node_shares(fresh, load, most, nodes))[0]
    empty = (kept < 0).reshape(layers, -1).sum(1)  # joined ranks' slots (a scale-up)
    full = empty == 0
    lift = np.zeros(layers)
    if 1 < slots <= LIFT_MOST_SLOTS:
        equal_split = fresh_balance if most is None else equal_split_balance(fresh, load)
        gain = fresh_balance - kept_balance
        # No plan of these replicas beats the bound: the lift stops there.
        room = np.maximum(balance_bound(fresh, load) - equal_split, 0.0)
        lift = np.minimum(packing_lift(fresh_balance - equal_split, gain, full, tolerance), room)
    if slots == 2 and nodes == 1:  # what a planner pairing an expert with itself reaches
        # (not a scale-up: its joined slots take the replicas cheaply, more swaps do not)
        gap = np.where(full, pairing_balance(fresh, load) - fresh_balance, 0.0)
        lift = np.maximum(lift, np.clip(gap, 0.0, tolerance))
    lost_experts = (expert_counts(kept, load.shape[1]) == 0).sum(1)
    target = layer_targets(fresh_balance, kept_balance, tolerance, lift, lost_experts > 0)
    budget = np.full(layers, limit)
    if slots >= 3:  # a scale-up's swaps then reuse the slots it already fills
        least = empty + lost_experts
        budget = np.where(empty > 0, np.minimum(limit, SCALE_UP_MOVES * least), limit)
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
        repair_balance = equal_split_balance(repaired, load)
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
        if nodes > 1:  # the fresh plan's nodes only where the repair's stay over the target
            mixed, mixed_units, reached = mix_nodes(
                load[contest],
                (repaired[contest], relabelled),
                _units_of(repaired[contest], units, contest),
                target[contest],
                (most, nodes),
            )
            mixed_cost = received_count(mixed, before)
            better = usable[contest] & reached & (mixed_cost < fresh_cost) & (mixed_cost <= limit)
            if better.any():
                done = contest[better]
                repaired[done], repair_cost[done] = mixed[better], mixed_cost[better]
                if units is not None:
                    units[done] = mixed_units[better]
                use_repair[done] = True
                repair_balance[done] = balance_with_units(
                    mixed[better], load[done], mixed_units[better]
                )[0]
                contest, before = contest[~better], before[~better]
                relabelled, fresh_cost = relabelled[~better], fresh_cost[~better]
    if contest.size:
        keep_repair = usable[contest] & (fresh_cost > limit)
        # A repair short of its target by less than `tolerance` stays when the fresh plan
        # would move more weights than the miss is worth: up to twice the repair's for a miss
        # of the whole tolerance (with few slots per rank, a fresh plan's packs share little
        # with the old ranks).
        short_by = target[contest] - repair_balance[contest]
        miss = np.clip(short_by / max(tolerance, 1e-12), 0.0, 1.0)
        worth = 1.0 + (NEAR_MISS_MOVES - 1) * miss
        keep_repair |= near[contest] & (fresh_cost > worth * repair_cost[contest])
        over = np.flatnonzero(~keep_repair & (fresh_cost > limit))
        if over.size:
            raise ValueError(
                f"max_transfers={max_transfers} cannot be met in layer {int(contest[over[0]])}: "
                f"the previous placement does not keep expert groups within nodes"
            )
        balance = np.where(use_repair, repair_balance, fresh_balance)
        balance[contest[keep_repair]] = repair_balance[contest[keep_repair]]
        keep_repair |= spend_surplus(
            balance,
            target + SURPLUS_KEPT * tolerance,
            (repair_balance[contest], fresh_balance[contest]),
            np.where(
                usable[contest]
                & ~keep_repair
                & (
                    repair_balance[contest]
                    >= fresh_balance[contest] - SURPLUS_MOST_LOSS * tolerance
                ),
                fresh_cost - repair_cost[contest],
                0,
            ),
        )
        chosen = repaired.copy()
        chosen[contest] = np.where(keep_repair[:, None, None], repaired[contest], relabelled)
        use_repair[contest] = keep_repair
        taken = contest[~keep_repair]
        if units is not None and most is not None and taken.size:
            units[taken] = node_shares(chosen[taken], load[taken], most, nodes)
    return chosen, use_repair, units


def mix_nodes(
    load: np.ndarray,
    plans: tuple[np.ndarray, np.ndarray],
    units: np.ndarray,
    target: np.ndarray,
    layout: tuple[int | None, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer of a hierarchical plan, each node from the repair where its ranks stay under
    the layer's mean rank load / ``target``, else from the relabelled fresh plan where that
    node holds the same experts in both and stays under it.

    Every expert of a hierarchical plan lives on one node and its routing units are solved
    per node, so nodes of the two plans combine freely where they hold the same experts: a
    scale-up whose repair misses its target on the node of a heavy expert only (60 x 384
    experts on 128 -> 144 x 3 slots, 8 nodes) re-plans that node, not the whole layer.

    Args:
        load: float64 [C, E]. plans: the repair and the relabelled fresh plan, int64
            [C, R, S] each. units: the repair's routing units int64 [C, R, S] (per node).
        target: float64 [C], balancedness each layer aims for. layout: (most, N): the most
            units an expert may have (``None``: the equal split) and the number of nodes.

    Returns:
        The mixed slots int64 [C, R, S] and units int64 [C, R, S], and bool [C]: True where
        no node of the mix is over the target.
    """
    most, nodes = layout
    repaired, relabelled = plans
    layers, ranks, per_rank = repaired.shape
    per_node = ranks // nodes
    cap = (load.sum(1) / ranks / np.maximum(target, 1e-300) * (1 + 1e-12))[:, None]

    def node_peaks(slots: np.ndarray, unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rank_load = balance_with_units(slots, load[rows], unit)[1].sum(2)
        return rank_load.reshape(rows.size, nodes, per_node).max(2)

    def node_experts(slots: np.ndarray) -> np.ndarray:
        local = slots.reshape(layers * nodes, per_node, per_rank)
        return expert_counts(local, load.shape[1]).reshape(layers, nodes, -1) > 0

    over = node_peaks(repaired, units, np.arange(layers)) > cap
    same = (node_experts(repaired) == node_experts(relabelled)).all(2)
    take = np.zeros_like(over)
    mixed, mixed_units = repaired.copy(), units.copy()
    # Layers where every node over the target has its fresh counterpart: only there is the
    # fresh plan's routing solved (one solve_shares).
    rows = np.flatnonzero(~(over & ~same).any(1) & over.any(1))
    if rows.size:
        fresh_units = _node_units(relabelled[rows], load[rows], most, nodes)
        take[rows] = over[rows] & (node_peaks(relabelled[rows], fresh_units, rows) <= cap[rows])
        mask = np.repeat(take[rows], per_node, axis=1)[:, :, None]
        mixed[rows] = np.where(mask, relabelled[rows], repaired[rows])
        mixed_units[rows] = np.where(mask, fresh_units, units[rows])
    return mixed, mixed_units, ~(over & ~take).any(1)


def _units_of(slots: np.ndarray, units: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """int64 [C, R, S]: ``units[rows]``, or one unit per replica of ``slots`` (the equal
    split) where there are no units."""
    return (slots >= 0).astype(np.int64) if units is None else units[rows]


def _node_units(slots: np.ndarray, load: np.ndarray, most: int | None, nodes: int) -> np.ndarray:
    """int64 [C, R, S]: :func:`node_shares` of ``slots``, or the equal split without ``most``."""
    return (slots >= 0).astype(np.int64) if most is None else node_shares(slots, load, most, nodes)


def spend_surplus(
    chosen: np.ndarray,
    target: np.ndarray,
    contested: tuple[np.ndarray, np.ndarray],
    saved: np.ndarray,
) -> np.ndarray:
    """bool [C]: the contested layers (whose repair misses its target) that keep the repair
    all the same, paid for by the balancedness other layers have over their targets.

    Balancedness is a mean over layers: the model stays at or above the mean of the targets
    where the layers' losses (fresh plan's balancedness less the repair's) sum to at most
    what the chosen layers have over their targets. Layers are taken by most weights saved
    per balancedness lost, while the losses fit (a hierarchical scale-up: the repair misses
    its target by 0.02 in a third of the layers, where the fresh plan moves 5x its weights).

    Args:
        chosen: float64 [L], each layer's balancedness as chosen so far (the fresh plan's
            for the contested ones). target: float64 [L].
        contested: the contested layers' repair and fresh balancedness, float64 [C] each.
        saved: int64 [C], weights the repair saves over the fresh plan (0: not a candidate).
    """
    repair_balance, fresh_balance = contested
    loss = np.maximum(fresh_balance - repair_balance, 0.0)
    surplus = float((chosen - target).sum())
    keep = np.zeros(saved.shape, dtype=bool)
    candidates = np.flatnonzero(saved > 0)
    if candidates.size == 0 or surplus <= 0:
        return keep
    # Most weights saved per balancedness lost first; ties by layer (deterministic).
    rate = saved[candidates] / np.maximum(loss[candidates], 1e-12)
    order = candidates[np.lexsort((candidates, -rate))]
    fits = np.cumsum(loss[order]) <= surplus
    keep[order[fits]] = True
    return keep


def packing_lift(
    share_gain: np.ndarray, gain: np.ndarray, full: np.ndarray, tolerance: float
) -> np.ndarray:
    """float64 [L]: how far above ``tolerance`` below the fresh plan a layer's target stays.

    Another planner's plan at the new size (other replica counts, no routing shares) may beat
    the fresh plan's equal split by up to ``PACKING_SLACK`` x ``tolerance``: where the
    previous placement leaves no slot empty (a scale-down) and the fresh plan gains over
    ``LIFT_GAIN`` on it (the repair re-plans much of the layer anyway), the target stays that
    much less what shares add to the fresh plan above the tolerance. Elsewhere (drift, a
    failure, a scale-up with its move budget) 0: a higher target there costs more moves and
    time than it gains.

    Args:
        share_gain: float64 [L], the fresh plan's balancedness with shares less its equal
            split's. gain: float64 [L], the fresh plan's less the placement's as it is.
        full: bool [L], True where the placement has no empty slot.
    """
    wanted = np.clip(PACKING_SLACK * tolerance - share_gain, 0.0, tolerance)
    return np.where(full & (gain > LIFT_GAIN), wanted, 0.0)


def pairing_balance(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [L]: the balancedness of the replicas of ``slots`` (int64 [L, R, 2], full)
    packed two per rank as the sorted pairing, heaviest with lightest, with the equal split.

    No packing of these replicas beats it, and a planner that may put two replicas of one
    expert on a rank reaches it (vLLM's packing of 2 slots per rank). Without that freedom an
    expert whose replicas straddle the middle of the order cannot pair with itself: the fresh
    plan lands under it (94 x 128 experts on 224 x 2 slots: 0.9039 with shares, the pairing
    0.9072), and a target a tolerance under the fresh plan would land under vLLM's less it.
    """
    layers, ranks, _ = slots.shape
    flat = slots.reshape(layers, -1)
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    weight = np.take_along_axis(load / counts, np.maximum(flat, 0), 1)
    weight = np.sort(np.where(flat >= 0, weight, 0.0), axis=1)
    pairs = weight[:, :ranks] + weight[:, : ranks - 1 : -1]
    peak = pairs.max(1)
    return np.where(peak > 0, weight.sum(1) / ranks / np.maximum(peak, 1e-300), 1.0)


def layer_targets(
    fresh: np.ndarray,
    kept: np.ndarray,
    tolerance: float,
    lift: np.ndarray | float = 0.0,
    lost: np.ndarray | None = None,
) -> np.ndarray:
    """float64 [L]: the balancedness each layer's repair aims for, from the fresh plan's
    ``fresh`` and the placement's as it is, ``kept`` (both float64 [L]).

    Within ``tolerance`` less ``lift`` (float64 [L] or 0, :func:`packing_lift`) of the fresh
    plan; where the fresh plan gains more than that over leaving the layer as it is, also
    ``RECOVERED`` of that gain. Where the whole model gains
    more than ``tolerance`` (the mean of the layers' gains, as balancedness is a mean over
    layers), every layer that gains keeps ``RECOVERED`` of its gain, however small: many
    layers each gaining a little (a hierarchical plan on many ranks, where node loads set the
    heaviest rank) would otherwise all stay as they are and the model lose its whole gain.

    ``lost`` (bool [L]): layers whose placement lacks an expert (a failure or a scale-down
    removed its every replica). Their ``kept`` leaves those experts' load out, so it is no plan
    to keep a share of the gain over: their target is the tolerance under the fresh plan, and
    the model's mean gain counts the other layers only (58 x 256 experts on 32 x 9 slots, a
    dead rank: 90% of a gain over 0.979 that no placement has cost 20.8% of the slots moved,
    the tolerance 15.1%).
    """
    gain = fresh - kept
    kept_plan = np.ones(gain.shape, dtype=bool) if lost is None else ~lost
    floor = 0.0 if kept_plan.any() and gain[kept_plan].mean() > tolerance else tolerance
    shortfall = np.where(kept_plan & (gain > floor), (1.0 - RECOVERED) * gain, tolerance)
    return fresh - np.minimum(tolerance - lift, shortfall)
