"""Hierarchical plans: expert groups stay inside one node.

With node-limited routing a token's experts come from few nodes, so each group of E / G
consecutive experts must live on one node. Groups are dealt to nodes (G / N each) in rounds,
heaviest group to lightest node, then improved by swaps between the heaviest node and every
other (DeepSeek's greedy packing leaves up to 7 points of balancedness here); with two groups
per node the rounds pair heaviest with lightest, which is optimal, so the pairs are formed
directly; with two nodes every split of the groups into halves is tried (35 for 8 groups, one
matrix product), which is optimal too and cheaper than the swaps. Each node is then an independent global problem over its own experts, ranks and
slots, solved for all (layer, node) pairs in one batch.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

from elastic_ep.eplb.packing import (
    expert_counts,
    improve_by_swaps,
    pack_rounds,
    sorted_replicas,
    static_slots,
)
from elastic_ep.eplb.rank_order import essential_one_slot
from elastic_ep.eplb.repair import repair
from elastic_ep.eplb.replication import descending_order
from elastic_ep.eplb.unit_balance import node_layer_means

_EXACT_SPLITS = 4096  # most splits of the groups into two halves that are all tried


def groups_to_nodes(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """int64 [L, N, G / N]: the groups each node gets, balancing the summed group load.

    Args:
        group_load: float64 [L, G], total load of each expert group.
        num_nodes: N, dividing G.
    """
    layers, groups = group_load.shape
    if groups == num_nodes:  # one group per node: every assignment gives the same node loads
        return np.broadcast_to(np.arange(groups)[:, None], (layers, groups, 1)).copy()
    if groups == 2 * num_nodes:
        # Two groups per node: heaviest with lightest minimises the heaviest node (what the
        # rounds below give, without their swaps, which cannot improve on it).
        order = descending_order(group_load)
        return np.stack([order[:, :num_nodes], order[:, : num_nodes - 1 : -1]], axis=2)
    if num_nodes == 2 and math.comb(groups - 1, groups // 2 - 1) <= _EXACT_SPLITS:
        return _best_halves(group_load)
    items, weight = sorted_replicas(np.ones((layers, groups), dtype=np.int64), group_load, groups)
    nodes, node_weight, node_load = pack_rounds(items, weight, num_nodes)
    improve_by_swaps(nodes, node_weight, max_steps=4 * groups, loads=node_load)
    return nodes


def _best_halves(group_load: np.ndarray) -> np.ndarray:
    """int64 [L, 2, G / 2]: the split of the G groups into two halves of G / 2 whose heavier
    half is lightest, tried exhaustively (one matrix product over the splits; the first of
    equal ones).

    ``group_load``: float64 [L, G].
    """
    first, second, members = _halves(group_load.shape[1])
    # The heavier half is lightest where the first half is nearest half the total.
    gap = np.abs(group_load @ members.T - 0.5 * group_load.sum(1, keepdims=True))  # [L, C]
    best = gap.argmin(1)
    return np.stack([first[best], second[best]], axis=1)


@lru_cache(maxsize=8)
def _halves(groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every split of ``groups`` groups into two halves, group 0 in the first: the first
    halves and the second, int64 [C, groups / 2] each (C = comb(groups - 1, groups / 2 - 1)),
    ascending; and float64 [C, groups], 1 where a group is in a split's first half."""
    first = np.array(
        [(0, *rest) for rest in itertools.combinations(range(1, groups), groups // 2 - 1)],
        dtype=np.int64,
    )
    taken = np.zeros((first.shape[0], groups), dtype=bool)
    np.put_along_axis(taken, first, True, axis=1)
    second = np.nonzero(~taken)[1].reshape(first.shape[0], -1)
    members = taken.astype(np.float64)
    for table in (first, second, members):
        table.flags.writeable = False
    return first, second, members


def hierarchical_slots(
    load: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    slots_per_rank: int,
    swap_steps: int,
    essential: bool = False,
) -> np.ndarray:
    """int64 [L, R, S]: a fresh plan whose node n (ranks n*R/N .. (n+1)*R/N - 1) holds only
    experts of the groups assigned to it.

    Args:
        load: float64 [L, E]; E divisible by num_groups, num_groups by num_nodes, num_ranks by
            num_nodes (checked by the caller).
        essential: with one slot per rank, each node's ranks in
            :func:`~elastic_ep.eplb.rank_order.essential_first`'s order, built with the plan
            (:func:`~elastic_ep.eplb.rank_order.essential_one_slot`); ignored with more.
    """
    layers, experts = load.shape
    group_size = experts // num_groups
    nodes = groups_to_nodes(load.reshape(layers, num_groups, group_size).sum(2), num_nodes)
    rows, per_node = layers * num_nodes, experts // num_nodes
    # Whole groups gathered as rows of group_size experts.
    group_rows = (nodes + (np.arange(layers) * num_groups)[:, None, None]).ravel()
    local_load = load.reshape(-1, group_size)[group_rows].reshape(rows, per_node)
    # Global expert id of every node-local expert, after a -1 column for empty slots:
    # [L * N, 1 + E / N].
    ids = np.full((rows, 1 + per_node), -1, dtype=np.int64)
    ids[:, 1:] = np.arange(experts).reshape(num_groups, group_size)[nodes].reshape(rows, per_node)
    if essential and slots_per_rank == 1:  # written as global ids at once
        local = essential_one_slot(local_load, num_ranks // num_nodes, ids[:, 1:])
        return local.reshape(layers, num_ranks, 1)
    # No node's heaviest rank is under its mean rank load: swaps on a node already under the
    # heaviest node's mean cannot lower the layer's heaviest rank.
    node_mean = local_load.sum(1).reshape(layers, num_nodes) * (num_nodes / num_ranks)
    floor = np.repeat(node_mean.max(1), num_nodes)
    local = static_slots(
        local_load, num_ranks // num_nodes, slots_per_rank, swap_steps, floor=floor
    )
    cell = local.reshape(rows, -1) + (np.arange(rows) * (1 + per_node) + 1)[:, None]
    return ids.ravel()[cell].reshape(layers, num_ranks, slots_per_rank)


def repair_within_nodes(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    num_groups: int,
    num_nodes: int,
    most: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Movement-aware repair that keeps every group on the node holding most of its replicas.

    Each node is repaired as a global problem over its own groups' experts (batched over
    (layer, node)); replicas of a group found on another node are dropped.

    Args:
        load: float64 [L, E]. kept: int64 [L, R, S], what each rank holds now.
        target: float64 [L], balancedness at which a layer stops swapping.
        budget: int64 [L], most weights received per layer, shared among its nodes.
        num_groups: G. num_nodes: N.
        most: the most routing units an expert may have, to measure balancedness with
            routing shares (:func:`elastic_ep.eplb.repair.repair`); ``None``: the equal split.

    Returns:
        int64 [L, R, S], the repaired placement; its routing units int64 [L, R, S], each node
        solved on its own (``None`` without ``most``); and bool [L]: False where the previous
        placement gives no node G / N groups (that layer's result is not usable).
    """
    layers, ranks, per_rank = kept.shape
    experts = load.shape[1]
    group_size, per_node = experts // num_groups, ranks // num_nodes
    local_experts, rows = experts // num_nodes, layers * num_nodes
    held = kept.reshape(layers, -1)
    # Flat group (layer * G + group) of every slot, L * G for an empty one: [L, R * S].
    group = np.where(
        held >= 0,
        held // group_size + (np.arange(layers) * num_groups)[:, None],
        layers * num_groups,
    )
    rank_node = np.arange(ranks).repeat(per_rank) // per_node  # [R * S]
    home, usable = _group_homes(group, rank_node, num_groups, num_nodes)
    group_load = load.reshape(layers, num_groups, group_size).sum(2)
    home = _trade_groups(home, group_load, target, num_nodes)
    # Each node's groups in group order, as rows of the flat [L * G] groups: [L * N, G / N].
    by_home = np.argsort(home * num_groups + np.arange(num_groups), axis=1)
    flat_groups = (by_home + (np.arange(layers) * num_groups)[:, None]).ravel()
    # Node-local id of every group's first expert, flat [L * G + 1] (the last entry: empty).
    first_local = np.zeros(layers * num_groups + 1, dtype=np.int64)
    first_local[flat_groups] = np.tile(np.arange(0, local_experts, group_size), rows)
    # Node-local id of every held replica (-1: empty, or its group lives on another node).
    at_home = np.append(home.ravel(), -1)[group] == rank_node
    local_kept = np.where(at_home, first_local[group] + held % group_size, -1)
    local_kept = local_kept.reshape(rows, per_node, per_rank)
    local_load = load.reshape(-1, group_size)[flat_groups].reshape(rows, local_experts)
    # A layer reaches `target` when no node's ranks exceed the layer's mean rank load / target.
    node_share = local_load.sum(1).reshape(layers, num_nodes) * num_nodes
    node_target = target[:, None] * node_share / np.maximum(load.sum(1), 1e-300)[:, None]
    orphans = (expert_counts(local_kept, local_experts) == 0).sum(1)
    orphans = orphans.reshape(layers, num_nodes)
    spare = np.maximum(budget - orphans.sum(1), 0) // num_nodes
    budgets = (orphans + spare[:, None]).ravel()
    # Each node's shares measured from its layer's mean rank load: a node nearly even within
    # itself may hold the layer's heaviest ranks (:func:`elastic_ep.eplb.shares.solve_shares`).
    local, units = repair(
        local_load,
        local_kept,
        node_target.ravel(),
        budgets,
        most=most,
        mean=node_layer_means(load, ranks, num_nodes),
    )
    # Global ids, after a -1 column for empty slots: [L * N, 1 + E / N].
    ids = np.full((rows, 1 + local_experts), -1, dtype=np.int64)
    ids[:, 1:] = (by_home[..., None] * group_size + np.arange(group_size)).reshape(rows, -1)
    cell = local.reshape(rows, -1) + (np.arange(rows) * (1 + local_experts) + 1)[:, None]
    if units is not None:
        units = units.reshape(layers, ranks, per_rank)
    return ids.ravel()[cell].reshape(layers, ranks, per_rank), units, usable


def _trade_groups(
    home: np.ndarray, group_load: np.ndarray, target: np.ndarray, num_nodes: int
) -> np.ndarray:
    """int64 [L, G]: ``home`` with one group of the heaviest node traded for one of the
    lightest in the layers whose node loads alone keep them below ``target`` (float64 [L]):
    the pair that leaves the heavier of the two lightest, where that lowers it. No placement
    within the nodes can reach a balancedness above mean / heaviest node load, and a trade
    moves two groups' weights where a fresh plan moves most of the layer's.

    Args:
        home: int64 [L, G] node of each group, G / N per node. group_load: float64 [L, G].
    """
    if num_nodes < 2 or home.shape[1] == num_nodes:
        return home  # one group per node: a trade only swaps two nodes' loads
    onehot = home[:, :, None] == np.arange(num_nodes)  # [L, G, N]
    node_load = (group_load[:, :, None] * onehot).sum(1)  # [L, N]
    peak, mean = node_load.max(1), node_load.mean(1)
    bound = np.where(peak > 0, mean / np.maximum(peak, 1e-300), 1.0)
    trade = np.flatnonzero(bound < target)
    if trade.size == 0:
        return home
    heavy, light = node_load[trade].argmax(1), node_load[trade].argmin(1)
    rows = np.arange(trade.size)
    load = group_load[trade]
    on_heavy = home[trade] == heavy[:, None]
    on_light = home[trade] == light[:, None]
    # After trading g (heavy node) for h (light node): max of the two nodes' loads, [T, G, G].
    delta = load[:, :, None] - load[:, None, :]
    heavy_after = node_load[trade, heavy][:, None, None] - delta
    light_after = node_load[trade, light][:, None, None] + delta
    worst = np.maximum(heavy_after, light_after)
    worst = np.where(on_heavy[:, :, None] & on_light[:, None, :], worst, np.inf)
    best = worst.reshape(trade.size, -1).argmin(1)
    g, h = np.divmod(best, load.shape[1])
    better = worst.reshape(trade.size, -1)[rows, best] < node_load[trade, heavy] * (1 - 1e-9)
    out = home.copy()
    out[trade[better], g[better]] = light[better]
    out[trade[better], h[better]] = heavy[better]
    return out


def _group_homes(
    group: np.ndarray, rank_node: np.ndarray, num_groups: int, num_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [L, G]: the node holding most replicas of each group, and bool [L]: whether every
    node is home to G / N groups (otherwise the homes are replaced by a fixed valid choice).

    Args:
        group: int64 [L, R * S], layer * G + group of every slot (L * G: empty).
        rank_node: int64 [R * S], the node of every slot.
    """
    layers = group.shape[0]
    cells = layers * num_groups * num_nodes
    counts = np.bincount((group * num_nodes + rank_node).ravel(), minlength=cells + num_nodes)
    home = counts[:cells].reshape(layers, num_groups, num_nodes).argmax(2)
    per_node = np.bincount(
        (home + (np.arange(layers) * num_nodes)[:, None]).ravel(), minlength=layers * num_nodes
    )
    usable = (per_node.reshape(layers, num_nodes) == num_groups // num_nodes).all(1)
    fallback = np.arange(num_groups) // (num_groups // num_nodes)
    return np.where(usable[:, None], home, fallback), usable
