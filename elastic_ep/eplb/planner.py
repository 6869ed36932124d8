"""The EPLB planner: load per expert in, :class:`Placement` out.

``plan`` makes a fresh plan (replica counts, packing, swaps; hierarchical when ``num_nodes > 1``).
Given a ``previous`` placement it also builds a movement-aware repair of that placement and, per
layer, keeps whichever of the two reaches the target balancedness with fewer weights received:

* repair: keep every replica still wanted, place the missing ones, then swap until the
  layer's target balancedness is reached or the budget is spent. Hierarchical plans repair each
  node on its own, keeping every group on the node that holds most of it;
* where the repair misses the target: the fresh plan, its packs relabelled onto the ranks that
  already hold most of their experts (a greedy matching on the sparse overlap graph,
  :mod:`elastic_ep.eplb.relabel`) and each rank's experts kept in their old slots. In a
  hierarchical plan only the nodes whose repair stays over the target take the fresh plan's
  node, where that node holds the same experts in both (every expert lives on one node and
  its shares are solved per node, so nodes combine freely).

The target of a layer is the fresh plan's balancedness minus ``balance_tolerance``; where the
fresh plan gains more than ``balance_tolerance`` over the previous placement, the target also
keeps ``RECOVERED`` (90%) of that gain; where the whole model gains more than that (the mean
of the layers' gains), every layer keeps ``RECOVERED`` of its own gain, however small. A
layer whose placement lost experts (a failure, a scale-down) keeps no share of a gain: the
placement without them is no plan to measure one over. A scale-down's target (2-3 slots per
rank, no empty slot, the fresh plan far above the placement) stays up to ``PACKING_SLACK`` x
``balance_tolerance`` higher, less what routing shares add and at most up to a bound on any
packing: another planner's plan may beat the fresh one by that much. A repair short of its
target by less than ``balance_tolerance`` is kept when the relabelled
fresh plan would move more weights than the miss is worth: 1 + x (``NEAR_MISS_MOVES`` - 1)
times the repair's for a miss of x ``balance_tolerance``; other misses are kept,
most weights saved per balancedness lost first, while the layers' balancedness over their
targets pays for them (the model's mean stays ``SURPLUS_KEPT`` x ``balance_tolerance`` above
the targets' mean; each such layer within ``SURPLUS_MOST_LOSS`` x ``balance_tolerance`` of
its fresh plan). A layer whose fresh plan needs more than ``max_transfers`` takes the
repair. A scale-up's repair with 3+ slots per rank receives at most ``SCALE_UP_MOVES`` times
the weights its joined slots and lost experts need.

The fresh plan that sets the targets first has the rows its rounds left stuck re-packed
(:mod:`elastic_ep.eplb.polish`: 3+ slots per rank, a hot replica near the mean load), so that
the targets are not set by a packing 0.01-0.02 short of a greedy one.

With one slot per rank the balancedness depends on the replica counts alone: a plan without
``max_transfers``, global or with one group per node, takes the repair
(:mod:`elastic_ep.eplb.single_slot`, the fresh plan's counts with the fewest transfers) without
building the fresh plan.

A plan without ``previous`` (global, or hierarchical with one slot per rank) has each node's
ranks ordered so that the highest, which a scale-down drops, hold the replicas it can spare
(:mod:`elastic_ep.eplb.rank_order`).

Every plan then gets routing shares (:mod:`elastic_ep.eplb.shares`): units per replica that
move load between replicas of one expert, from heavy ranks to light ones, without moving a
weight (``shares=False`` keeps the equal split). With a previous placement and shares, every
balancedness above is measured with them (the fresh plan's, the repair's, and the previous
placement's with its own units), so the repair stops moving weights once shares reach the
target (:mod:`elastic_ep.eplb.repair`); the placement keeps the units it was measured with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from elastic_ep.eplb.hierarchical import hierarchical_slots
from elastic_ep.eplb.incremental import drop_duplicates
from elastic_ep.eplb.packing import expert_counts, static_slots
from elastic_ep.eplb.placement import Placement, max_units
from elastic_ep.eplb.polish import repack_stuck
from elastic_ep.eplb.rank_order import essential_first, essential_one_slot
from elastic_ep.eplb.repair_choice import (
    prefer_repair,
    single_slot_repair,
)
from elastic_ep.eplb.repair_swaps import received_count
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.unit_balance import balance_with_units, equal_split_balance
from elastic_ep.rank_mapping import RankMapping

DEFAULT_SWAP_STEPS = 8
"""Improvement swaps per layer in a fresh plan (each lowers the heaviest rank); 8 rather than 2
costs 5-10% of a fresh plan and gains up to 0.03 balancedness where few slots per rank leave the
packing rounds uneven (58 x 256 experts on 32 x 9 slots, Zipf 1.2: 0.971 -> 0.999)."""
HIERARCHICAL_SWAP_STEPS = 2
"""Swaps per (layer, node) row of a hierarchical plan, fresh or setting a repair's target: the
heaviest node's mean load sets most layers' heaviest rank and rows under it stop at once, so
8 steps gain at most 0.0017 over 2 in the sweep's 99 hierarchical cells (94 x 128 experts on
16 x 9 slots, 2 nodes, 0.0429 -> 0.0412 over vLLM) and cost up to 25% of the plan."""
ORDER_MOST_SLOTS = 1
"""Most slots per rank at which a hierarchical fresh plan's ranks are ordered for scale-downs
(:mod:`elastic_ep.eplb.rank_order`); global plans are ordered at any number. With one slot per
rank the sweep's 12.5% scale-downs then move 0-0.4% of the slots instead of 11-14% (22 cells;
vLLM 0%). With 2-9 slots the order cuts a global scale-down's moves from 12.3% to 9.4% of the
slots on average (78 sweep cells: fewer in 57, more in 5) and the cells over twice the minimum
from 34 to 10, for 10-27% of a global fresh plan's time. Hierarchical scale-downs move less
already (4.4% -> 3.1%, 3 -> 1 cells over twice the minimum), and there the order costs 30-80%
of a fresh plan of (layer, node) rows (11 more of 99 fresh cells under 20x vLLM)."""
REPAIR_SWAP_STEPS = 8
"""Swaps of the fresh plan when a previous placement is given: it sets the repair's target."""


@dataclass(frozen=True, eq=False)
class PlanReport:
    """What :func:`plan_with_report` decided, beside the placement.

    Attributes:
        placement: the new placement (what :func:`plan` returns).
        lost: bool [L, E]: experts whose every replica was on a dead rank; they are placed
            anyway and must be reloaded from a checkpoint, not received from a peer.
        transfers: int64 [L]: expert weights received per layer (everything placed, without a
            ``previous``).
        repaired: bool [L]: True where the layer is the movement-aware repair of ``previous``
            (in a hierarchical plan some of its nodes may be the fresh plan's), False where it
            is the relabelled fresh plan.
    """

    placement: Placement
    lost: torch.Tensor
    transfers: torch.Tensor
    repaired: torch.Tensor


def plan(
    load: torch.Tensor | np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    previous: Placement | None = None,
    rank_mapping: RankMapping | None = None,
    dead_ranks: Iterable[int] = (),
    max_transfers: int | None = None,
    balance_tolerance: float = 0.01,
    swap_steps: int | None = None,
    shares: bool = True,
) -> Placement:
    """Place E logical experts of L layers on R ranks with S slots each.

    Args:
        load: [L, E] real, finite, non-negative load per logical expert (tokens routed).
        num_ranks: R. slots_per_rank: S; R * S >= E. Slots left over stay empty (-1).
        num_groups: G, expert groups of E / G consecutive experts (used when num_nodes > 1).
        num_nodes: N; > 1 keeps every group inside one node of R / N consecutive ranks.
        previous: the current placement (over the old ranks, same L, E and S).
        rank_mapping: old rank -> new rank (scale events, failures); identity if ``None``.
        dead_ranks: old ranks that failed (cannot send); they must be removed in
            ``rank_mapping``. Their experts are never counted as already present.
        max_transfers: most expert weights received per layer (needs ``previous``); experts
            with no surviving replica are always placed and count against it.
        balance_tolerance: how far below the fresh plan's balancedness a movement-aware result
            may stay to save transfers.
        swap_steps: improvement swaps per layer in the fresh plan; default
            ``DEFAULT_SWAP_STEPS`` without ``previous``, ``REPAIR_SWAP_STEPS`` with it,
            ``HIERARCHICAL_SWAP_STEPS`` either way where ``num_nodes > 1``
            (the fresh plan then sets the balancedness the repair aims for).
        shares: give the replicas routing shares that lower the heaviest ranks
            (``Placement.units``, :func:`elastic_ep.eplb.shares.solve_shares`); ``False``: all
            units 1, each expert's load split evenly over its replicas.

    Returns:
        A :class:`Placement` with no expert twice on one rank and every expert placed.

    Raises:
        TypeError / ValueError naming the problem for bad shapes, dtypes, values or layouts.
    """
    if previous is None:  # the fresh plan alone, without the report's per-layer figures
        weights = _checked_load(
            load, num_ranks, slots_per_rank, num_groups, num_nodes, balance_tolerance, swap_steps
        )
        _check_fresh(rank_mapping, dead_ranks, max_transfers)
        fresh = _fresh_alone(weights, num_ranks, slots_per_rank, num_groups, num_nodes, swap_steps)
        return _to_placement(fresh, weights, num_ranks, shares)
    return plan_with_report(
        load,
        num_ranks,
        slots_per_rank,
        num_groups=num_groups,
        num_nodes=num_nodes,
        previous=previous,
        rank_mapping=rank_mapping,
        dead_ranks=dead_ranks,
        max_transfers=max_transfers,
        balance_tolerance=balance_tolerance,
        swap_steps=swap_steps,
        shares=shares,
    ).placement


def plan_with_report(
    load: torch.Tensor | np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    previous: Placement | None = None,
    rank_mapping: RankMapping | None = None,
    dead_ranks: Iterable[int] = (),
    max_transfers: int | None = None,
    balance_tolerance: float = 0.01,
    swap_steps: int | None = None,
    shares: bool = True,
) -> PlanReport:
    """:func:`plan`, also returning the lost experts, transfers and choice per layer."""
    weights = _checked_load(
        load, num_ranks, slots_per_rank, num_groups, num_nodes, balance_tolerance, swap_steps
    )
    layers, experts = weights.shape
    dead = sorted(set(dead_ranks))
    if previous is None:
        _check_fresh(rank_mapping, dead, max_transfers)
        fresh = _fresh_alone(weights, num_ranks, slots_per_rank, num_groups, num_nodes, swap_steps)
        return PlanReport(
            placement=_to_placement(fresh, weights, num_ranks, shares),
            lost=torch.zeros(layers, experts, dtype=torch.bool),
            transfers=torch.from_numpy(np.count_nonzero(fresh.reshape(layers, -1) >= 0, axis=1)),
            repaired=torch.zeros(layers, dtype=torch.bool),
        )
    mapping = _check_previous(
        previous, weights.shape, num_ranks, slots_per_rank, rank_mapping, dead
    )
    if max_transfers is not None:
        _check_int("max_transfers", max_transfers, minimum=0)
    kept = kept_on_new_ranks(previous, mapping)
    if slots_per_rank > 1:  # with one slot a rank cannot hold a second copy
        kept = drop_duplicates(kept)
    missing = (expert_counts(kept, experts) == 0).sum(1)
    if max_transfers is not None and int(missing.max()) > max_transfers:
        layer = int(missing.argmax())
        raise ValueError(
            f"max_transfers={max_transfers} is below the {int(missing[layer])} experts of layer "
            f"{layer} that have no replica left on the new ranks and must be placed"
        )
    steps = _swap_steps(swap_steps, REPAIR_SWAP_STEPS, num_nodes)
    # Global plans: the fresh plan and the repair want the same replica counts.
    counts = (
        None if num_nodes > 1 else replica_counts(weights, num_ranks * slots_per_rank, num_ranks)
    )
    chosen = single_slot_repair(weights, kept, max_transfers, num_groups, num_nodes, counts)
    units = None
    if chosen is not None:
        repaired = np.ones(layers, dtype=bool)
    else:
        fresh = _fresh(weights, num_ranks, slots_per_rank, num_groups, num_nodes, steps, counts)
        repack_stuck(fresh, weights, num_nodes)  # it sets the target: not stuck short of it
        most = max_units(num_ranks * slots_per_rank, experts) if shares else None
        if most is None:
            before = equal_split_balance(kept, weights)
        else:  # as the ranks route now, with the previous placement's shares
            held = np.where(kept >= 0, kept_on_new_ranks(previous, mapping, previous.units), 0)
            before = balance_with_units(kept, weights, held)[0]
        chosen, repaired, units = prefer_repair(
            weights,
            fresh,
            (kept, before),
            max_transfers,
            balance_tolerance,
            (num_groups, num_nodes),
            counts,
            most,
        )
    if units is None:
        placement = _to_placement(chosen, weights, num_ranks, shares)
    else:  # the units the choice was measured with (per node for hierarchical plans)
        flat = np.ascontiguousarray(chosen.reshape(layers, -1))
        placement = Placement._trusted(
            torch.from_numpy(flat), experts, num_ranks, torch.from_numpy(units.reshape(layers, -1))
        )
    return PlanReport(
        placement=placement,
        lost=torch.from_numpy(_lost(previous, dead)),
        transfers=torch.from_numpy(received_count(chosen, kept)),
        repaired=torch.from_numpy(repaired),
    )


def _checked_load(
    load: torch.Tensor | np.ndarray,
    ranks: int,
    slots: int,
    groups: int,
    nodes: int,
    balance_tolerance: float,
    swap_steps: int | None,
) -> np.ndarray:
    """float64 [L, E]: ``load`` as an array, once the arguments every plan takes are checked."""
    weights = as_load_array(load)
    _check_layout(weights.shape[1], ranks, slots, groups, nodes)
    if not isinstance(balance_tolerance, (int, float)) or not 0 <= balance_tolerance <= 1:
        raise ValueError(f"balance_tolerance must be in [0, 1], got {balance_tolerance!r}")
    if swap_steps is not None:
        _check_int("swap_steps", swap_steps, minimum=0)
    return weights


def _check_fresh(
    rank_mapping: RankMapping | None, dead_ranks: Iterable[int], max_transfers: int | None
) -> None:
    if rank_mapping is not None or any(True for _ in dead_ranks) or max_transfers is not None:
        raise ValueError("rank_mapping, dead_ranks and max_transfers need a previous placement")


def _swap_steps(given: int | None, default: int, nodes: int) -> int:
    """The swap steps of a fresh plan: ``given``, else ``default`` (global) or
    ``HIERARCHICAL_SWAP_STEPS``."""
    if given is not None:
        return given
    return default if nodes == 1 else HIERARCHICAL_SWAP_STEPS


def _fresh_alone(
    load: np.ndarray, ranks: int, slots: int, groups: int, nodes: int, swap_steps: int | None
) -> np.ndarray:
    """int64 [L, R, S]: the fresh plan without a previous placement, its ranks ordered so that
    the highest, which a scale-down drops, hold the replicas it can spare
    (:mod:`elastic_ep.eplb.rank_order`; hierarchical plans with one slot per rank only, see
    ``ORDER_MOST_SLOTS``)."""
    steps = _swap_steps(swap_steps, DEFAULT_SWAP_STEPS, nodes)
    if slots == 1:  # packed and ordered at once
        if nodes > 1:
            return hierarchical_slots(load, groups, nodes, ranks, slots, steps, essential=True)
        return essential_one_slot(load, ranks)
    fresh = _fresh(load, ranks, slots, groups, nodes, steps)
    if nodes > 1 and slots > ORDER_MOST_SLOTS:
        return fresh
    return essential_first(fresh, load, nodes)


def _fresh(
    load: np.ndarray,
    ranks: int,
    slots: int,
    groups: int,
    nodes: int,
    swap_steps: int,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    if nodes > 1:
        return hierarchical_slots(load, groups, nodes, ranks, slots, swap_steps)
    return static_slots(load, ranks, slots, swap_steps, counts)


def kept_on_new_ranks(
    previous: Placement, mapping: RankMapping, table: torch.Tensor | None = None
) -> np.ndarray:
    """int64 [L, R_new, S]: what each new rank holds before the change (-1 for joined ranks);
    with ``table`` (int64 [L, R_old * S], e.g. ``previous.units``) its entries instead (0 for
    joined ranks)."""
    values = previous.phy2log if table is None else table
    old = values.numpy().reshape(previous.num_layers, previous.num_ranks, -1)
    source = np.array([-1 if o is None else o for o in mapping.new_to_old], dtype=np.int64)
    out = old[:, np.maximum(source, 0)]
    out[:, source < 0] = -1 if table is None else 0
    return out


def _lost(previous: Placement, dead: list[int]) -> np.ndarray:
    """bool [L, E]: experts of ``previous`` whose every replica is on a ``dead`` rank (what
    :meth:`Placement.lost_with` gives, without its dense [L, R, E] presence table)."""
    old = previous.phy2log.numpy().reshape(previous.num_layers, previous.num_ranks, -1)
    if not dead:
        return np.zeros((previous.num_layers, previous.num_logical), dtype=bool)
    alive = np.ones(previous.num_ranks, dtype=bool)
    alive[dead] = False
    before = expert_counts(old, previous.num_logical) > 0
    return before & (expert_counts(old[:, alive], previous.num_logical) == 0)


def as_load_array(load: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 [L, E] numpy copy of ``load``, or TypeError/ValueError naming what is wrong."""
    if isinstance(load, torch.Tensor):
        if (
            load.dtype == torch.bool
            or load.is_complex()
            or not (load.is_floating_point() or load.dtype in _TORCH_INTS)
        ):
            raise TypeError(f"load must hold real numbers, got dtype {load.dtype}")
        array = load.detach().to("cpu", torch.float64).numpy()
    elif isinstance(load, np.ndarray):
        if load.dtype.kind not in "iuf":
            raise TypeError(f"load must hold real numbers, got dtype {load.dtype}")
        array = load.astype(np.float64)
    else:
        raise TypeError(f"load must be a torch.Tensor or numpy.ndarray, got {type(load).__name__}")
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"load must have shape [layers, experts], got {tuple(array.shape)}")
    if array.min() >= 0 and array.max() < np.inf:  # NaN fails both comparisons
        return array
    if not np.isfinite(array).all():
        layer, expert = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"load[{layer}, {expert}] = {array[layer, expert]} is not finite")
    if (array < 0).any():
        layer, expert = (int(i) for i in np.argwhere(array < 0)[0])
        raise ValueError(f"load[{layer}, {expert}] = {array[layer, expert]} is negative")
    return array


_TORCH_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_layout(experts: int, ranks: int, slots: int, groups: int, nodes: int) -> None:
    for name, value in (
        ("num_ranks", ranks),
        ("slots_per_rank", slots),
        ("num_groups", groups),
        ("num_nodes", nodes),
    ):
        _check_int(name, value, minimum=1)
    if ranks * slots < experts:
        raise ValueError(
            f"{ranks} ranks x {slots} slots = {ranks * slots} slots cannot hold {experts} experts"
        )
    if experts % groups:
        raise ValueError(f"{experts} experts do not split into num_groups={groups} equal groups")
    if nodes == 1:
        return
    if groups % nodes:
        raise ValueError(
            f"num_groups={groups} is not a multiple of num_nodes={nodes}: a group would be "
            f"larger than a node's share"
        )
    if ranks % nodes:
        raise ValueError(f"num_ranks={ranks} is not a multiple of num_nodes={nodes}")
    if ranks // nodes * slots < experts // nodes:
        raise ValueError(
            f"a node has {ranks // nodes * slots} slots but its groups hold "
            f"{experts // nodes} experts"
        )


def _check_previous(
    previous: Placement,
    shape: tuple[int, ...],
    ranks: int,
    slots: int,
    rank_mapping: RankMapping | None,
    dead: list[int],
) -> RankMapping:
    if not isinstance(previous, Placement):
        raise TypeError(f"previous must be a Placement, got {type(previous).__name__}")
    if (previous.num_layers, previous.num_logical) != shape:
        raise ValueError(
            f"previous is {previous.num_layers} layers x {previous.num_logical} experts, "
            f"load is {shape[0]} x {shape[1]}"
        )
    if previous.slots_per_rank != slots:
        raise ValueError(
            f"previous has {previous.slots_per_rank} slots per rank, the plan {slots}: slots per "
            f"rank must stay constant"
        )
    mapping = rank_mapping if rank_mapping is not None else RankMapping.identity(previous.num_ranks)
    if not isinstance(mapping, RankMapping):
        raise TypeError(f"rank_mapping must be a RankMapping, got {type(mapping).__name__}")
    if mapping.old_world_size != previous.num_ranks or mapping.new_world_size != ranks:
        raise ValueError(
            f"rank_mapping maps {mapping.old_world_size} -> {mapping.new_world_size} ranks, "
            f"expected {previous.num_ranks} (previous) -> {ranks} (num_ranks)"
        )
    for rank in dead:
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < previous.num_ranks:
            raise ValueError(
                f"dead rank {rank!r} is not a rank of previous (0..{previous.num_ranks - 1})"
            )
        if mapping.new_rank(int(rank)) is not None:
            raise ValueError(f"dead rank {rank} is not removed in rank_mapping")
    return mapping


def _to_placement(slots: np.ndarray, load: np.ndarray, ranks: int, shares: bool) -> Placement:
    # The planner's slots are valid by construction (tests/test_planner*.py check it): skip
    # re-validating and copying them.
    layers, experts = load.shape
    flat = np.ascontiguousarray(slots.reshape(layers, -1))
    units = None
    if shares:
        most = max_units(flat.shape[1], experts)
        units = torch.from_numpy(solve_shares(slots, load, most).reshape(layers, -1))
    return Placement._trusted(torch.from_numpy(flat), experts, ranks, units)
