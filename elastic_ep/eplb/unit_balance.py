"""Balancedness of a placement whose replicas take routing units: the repair's measure.

A replica in a slot takes ``units[slot]`` of its expert's units summed over the slots (the
routing shares of :mod:`elastic_ep.eplb.shares`), so a slot's load is its expert's load times
its units over that sum, and a rank's load the sum over its slots. Batched over rows (layers,
or (layer, node) rows of a hierarchical plan) on the layout of :mod:`elastic_ep.eplb.packing`
(``slots`` int64 [B, R, S], -1 = empty). :mod:`elastic_ep.eplb.repair` measures every step of
its ladder with :func:`balance_with_units`, carries units across swaps with
:func:`unit_totals` and :func:`carried_units` (share-carrying swaps) or :func:`followed_units`
(swaps by the equal split, whose units then start the next solve), and :func:`node_shares`
solves a hierarchical plan's shares node by node.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.repair_swaps import slot_sum
from elastic_ep.eplb.shares import solve_shares


def slot_groups(slots: np.ndarray, experts: int) -> np.ndarray:
    """int64 [B, R * S]: the flat (row, expert + 1) of every slot of ``slots`` int64 [B, R, S],
    E + 1 per row, the first of a row for its empty slots."""
    rows = slots.shape[0]
    return slots.reshape(rows, -1) + (np.arange(rows) * (experts + 1) + 1)[:, None]


def unit_totals(slots: np.ndarray, experts: int, units: np.ndarray) -> np.ndarray:
    """float64 [B, E + 1]: each expert's ``units`` (int64 [B, R, S]) summed over ``slots``
    (int64 [B, R, S]), in column e + 1; column 0 gathers the empty slots."""
    rows = slots.shape[0]
    group = slot_groups(slots, experts).ravel()
    total = np.bincount(group, weights=units.ravel(), minlength=rows * (experts + 1))
    return total.reshape(rows, experts + 1)


def carried_units(
    slots: np.ndarray, load: np.ndarray, weight: np.ndarray, totals: np.ndarray
) -> np.ndarray:
    """int64 [B, R, S]: the units of each slot after swaps that moved every slot's load
    ``weight`` (float64 [B, R, S]) with it: ``weight / (load / total)`` for ``totals`` float64
    [B, E + 1] the experts' units (:func:`unit_totals`, unchanged by swaps); 1 for an expert
    without load."""
    experts = load.shape[1]
    padded = np.zeros((slots.shape[0], experts + 1))
    padded[:, 1:] = load
    per_unit = (padded / np.maximum(totals, 1)).ravel()[slot_groups(slots, experts)]
    per_unit = per_unit.reshape(slots.shape)
    units = np.rint(weight / np.where(per_unit > 0, per_unit, 1.0)).astype(np.int64)
    return np.where(slots < 0, 0, np.where(per_unit > 0, np.maximum(units, 1), 1))


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
    every expert's replicas are on one node, as in a hierarchical plan: each node with ranks
    above its layer's mean rank load then lowers its own heaviest rank, not only the node
    holding the row's heaviest; each is measured from that mean, see :func:`solve_shares`)."""
    if nodes == 1:
        return solve_shares(slots, load, most)
    rows, ranks, per_rank = slots.shape
    local = slots.reshape(rows * nodes, ranks // nodes, per_rank)
    mean = node_layer_means(load, ranks, nodes)
    units = solve_shares(local, np.repeat(load, nodes, axis=0), most, mean)
    return units.reshape(slots.shape)


def node_layer_means(load: np.ndarray, ranks: int, nodes: int) -> np.ndarray:
    """float64 [L * N]: for each (layer, node) row of a hierarchical plan, its layer's mean
    rank load (``load`` float64 [L, E] over ``ranks`` ranks), the ``mean`` that
    :func:`solve_shares` measures a node row from."""
    return np.repeat(load.sum(1) / ranks, nodes)


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
    group = slot_groups(slots, experts)
    total = np.bincount(group.ravel(), weights=units.ravel(), minlength=rows * (experts + 1))
    weight = np.zeros((rows, experts + 1))
    weight[:, 1:] = load
    per_unit = weight.ravel() / np.maximum(total, 1)
    slot_weight = (per_unit[group] * units).reshape(rows, ranks, per_rank)
    rank_load = slot_sum(slot_weight)
    peak = np.maximum.reduce(rank_load, axis=1)  # .max(1) and .sum(1), without their wrappers
    mean = np.add.reduce(rank_load, axis=1) / ranks
    balance = np.where(peak > 0, mean / np.maximum(peak, 1e-300), 1.0)
    return balance, slot_weight


def equal_split_balance(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [B]: balancedness of every row with the equal split."""
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    rank_load = slot_sum(slot_loads(slots, load / counts))
    peak = rank_load.max(1)
    return np.where(peak > 0, rank_load.mean(1) / np.maximum(peak, 1e-300), 1.0)


def followed_units(before: np.ndarray, after: np.ndarray, units: np.ndarray) -> np.ndarray:
    """int64 [B, R, S]: ``units`` (int64 [B, R, S], of the slots ``before``) moved with their
    replicas to ``after`` (int64 [B, R, S], as many replicas of each expert in each row as
    ``before``: swaps): a slot that kept its expert keeps its units, and the k-th slot (in
    slot order) an expert reached takes the units of the k-th slot it left; 0 for empty
    slots."""
    old, new = before.reshape(-1), after.reshape(-1)
    changed = old != new
    out = np.where(changed, 0, units.reshape(-1))
    at = np.flatnonzero(changed)
    if at.size == 0:
        return out.reshape(after.shape)
    was, now = old.take(at), new.take(at)
    # Sorted by (row, expert, slot): the k-th slot an expert left goes to the k-th it reached.
    span = int(max(was.max(), now.max())) + 2
    row = at // (before.shape[1] * before.shape[2]) * span + 1
    left, came = at[was >= 0], at[now >= 0]
    left = left.take(np.argsort((row + was)[was >= 0], kind="stable"))
    came = came.take(np.argsort((row + now)[now >= 0], kind="stable"))
    out[came] = units.reshape(-1).take(left)
    return out.reshape(after.shape)
