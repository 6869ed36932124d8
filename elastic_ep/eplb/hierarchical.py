"""Hierarchical plans: expert groups stay inside one node.

With node-limited routing a token's experts come from few nodes, so each group of E / G
consecutive experts must live on one node. Groups are dealt to nodes (G / N each) in rounds,
heaviest group to lightest node, then improved by swaps between the heaviest node and every
other (DeepSeek's greedy packing leaves up to 7 points of balancedness here). Each node is then
an independent global problem over its own experts, ranks and slots, solved for all
(layer, node) pairs in one batch.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.packing import improve_by_swaps, pack_rounds, sorted_replicas, static_slots


def groups_to_nodes(group_load: np.ndarray, num_nodes: int) -> np.ndarray:
    """int64 [L, N, G / N]: the groups each node gets, balancing the summed group load.

    Args:
        group_load: float64 [L, G], total load of each expert group.
        num_nodes: N, dividing G.
    """
    layers, groups = group_load.shape
    items = sorted_replicas(np.ones((layers, groups), dtype=np.int64), group_load, groups)
    nodes = pack_rounds(items, group_load, num_nodes)
    improve_by_swaps(nodes, group_load, max_steps=4 * groups)
    return nodes


def hierarchical_slots(
    load: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    slots_per_rank: int,
    swap_steps: int,
) -> np.ndarray:
    """int64 [L, R, S]: a fresh plan whose node n (ranks n*R/N .. (n+1)*R/N - 1) holds only
    experts of the groups assigned to it.

    Args:
        load: float64 [L, E]; E divisible by num_groups, num_groups by num_nodes, num_ranks by
            num_nodes (checked by the caller).
    """
    layers, experts = load.shape
    group_size = experts // num_groups
    nodes = groups_to_nodes(load.reshape(layers, num_groups, group_size).sum(2), num_nodes)
    # Global expert id of every node-local expert: [L * N, E / N].
    local_ids = (nodes[..., None] * group_size + np.arange(group_size)).reshape(
        layers * num_nodes, experts // num_nodes
    )
    local_load = np.take_along_axis(np.repeat(load, num_nodes, axis=0), local_ids, axis=1)
    local = static_slots(local_load, num_ranks // num_nodes, slots_per_rank, swap_steps)
    flat = local.reshape(layers * num_nodes, -1)
    ids = np.where(flat >= 0, np.take_along_axis(local_ids, np.maximum(flat, 0), axis=1), -1)
    return ids.reshape(layers, num_ranks, slots_per_rank)
