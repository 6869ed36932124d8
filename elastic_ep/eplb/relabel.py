"""Relabel a fresh plan onto the previous one: which new pack becomes which rank.

A static plan only says which experts share a rank, not which rank. Giving every pack the rank
that already holds the most of its experts is a maximum-weight bipartite matching between packs
and old ranks, with weight = experts shared. That graph is sparse: a pack shares experts only
with the ranks holding one of its S experts, about ``S * replicas`` of them, so the edges number
``sum over experts of (new replicas x old replicas)`` per layer, not R^2. The edges are built by
one sort-merge join over (layer, expert) and matched greedily, heaviest edge first (a 1/2
approximation in general; exact when every pack holds one expert, where the graph is a union of
complete bipartite blocks, one per expert). The greedy order is applied in rounds, all layers at
once: an edge that is the best remaining one of both its pack and its rank is taken, which gives
the same matching as the sequential greedy. Packs left without a shared expert take the ranks
left over, in order.

Hierarchical plans match nodes first (weight = experts the two nodes share), then ranks only
within matched node pairs, so node-local packs stay on one node.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RELABEL_FAN = 8
"""Most old replicas of its expert one new replica is joined with (see :func:`overlap_edges`)."""


class Overlap(NamedTuple):
    """Sparse overlap graph between the packs of a plan and the old ranks, sorted by layer.

    Every field is an array [M], one entry per (layer, pack, rank) that share an expert.
    """

    layer: np.ndarray  # int64
    pack: np.ndarray  # int64, the pack's index (its rank in the fresh plan)
    rank: np.ndarray  # int64, the old rank
    weight: np.ndarray  # int64 >= 1, experts the two share


def overlap_edges(packs: np.ndarray, kept: np.ndarray) -> Overlap:
    """The :class:`Overlap` of ``packs`` and ``kept`` (both int64 [B, R, S], -1 = empty, no
    expert twice on one rank), exact for experts with at most ``RELABEL_FAN`` old replicas.

    An expert with more old replicas m (a heavy one, replicated on many ranks) would add n x m
    edges; its i-th new replica is joined only with the ``RELABEL_FAN`` old ones from
    ``i * m // n`` on, a band that still holds a perfect matching of its replicas, so the edges
    stay within ``RELABEL_FAN * R * S`` per layer. Overlaps through heavy experts outside the
    band are not seen by the matching (the transfers are counted exactly afterwards)."""
    batch, ranks, per_rank = packs.shape
    num_experts = int(max(packs.max(), kept.max())) + 1
    rank_of_slot = np.arange(ranks * per_rank) // per_rank
    row_base = (np.arange(batch) * num_experts)[:, None]
    old = kept.reshape(batch, -1)
    old_valid = old >= 0
    old_key = (old + row_base)[old_valid]  # (layer, expert) of every kept replica
    old_rank = np.broadcast_to(rank_of_slot, old.shape)[old_valid]
    order = np.argsort(old_key, kind="stable")
    old_rank = old_rank[order]
    count = np.bincount(old_key, minlength=batch * num_experts)
    start = np.cumsum(count) - count
    new = packs.reshape(batch, -1)
    new_valid = new >= 0
    new_key = (new + row_base)[new_valid]
    new_pack = np.broadcast_to(rank_of_slot, new.shape)[new_valid]
    # The i-th of n new replicas of an expert with m old ones meets the old replicas
    # i * m // n + t (mod m), t < min(m, RELABEL_FAN): all of them when m <= RELABEL_FAN.
    new_count = np.bincount(new_key, minlength=batch * num_experts)
    by_key = np.argsort(new_key, kind="stable")
    nth = np.empty(new_key.size, dtype=np.int64)
    nth[by_key] = np.arange(new_key.size) - (np.cumsum(new_count) - new_count)[new_key[by_key]]
    many = count[new_key]
    fan = np.minimum(many, RELABEL_FAN)
    source = np.repeat(np.arange(new_key.size), fan)
    step = np.arange(source.size) - np.repeat(np.cumsum(fan) - fan, fan)
    first = nth * many // new_count[new_key]
    offset = (first[source] + step) % many[source]
    rank = old_rank[start[new_key[source]] + offset]
    layer = new_key[source] // num_experts
    edge = (layer * ranks + new_pack[source]) * ranks + rank
    edge.sort()
    first = np.flatnonzero(np.diff(edge, prepend=-1))  # runs of one (layer, pack, rank)
    weight = np.diff(first, append=edge.size)
    edge = edge[first]
    pair, rank = np.divmod(edge, ranks)
    layer, pack = np.divmod(pair, ranks)
    return Overlap(layer, pack, rank, weight.astype(np.int64))


def greedy_matching(
    left: np.ndarray, right: np.ndarray, weight: np.ndarray, num_vertices: int
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximum-weight matching: heaviest edge first, ties in a fixed scrambled order.

    Args:
        left, right: int64 [M], the endpoints of every edge, each in [0, num_vertices) (left
            and right vertices are separate sets).
        weight: int64 [M].

    Returns:
        int64 [num_vertices] twice: the right vertex matched to each left vertex and the left
        vertex matched to each right one, -1 where unmatched.
    """
    # Heaviest first; ties in a scrambled but fixed order (a multiplicative hash of the
    # position), which keeps the chains of equal edges, and so the rounds, short.
    scramble = (np.arange(weight.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> 40
    order = np.lexsort((scramble, -weight))
    left, right = left[order], right[order]
    right_of = np.full(num_vertices, -1, dtype=np.int64)
    left_of = np.full(num_vertices, -1, dtype=np.int64)
    position = np.arange(left.size)
    while left.size:
        # An edge that is the first remaining one of both its endpoints is taken: no better
        # edge can ever claim either endpoint, as in the sequential greedy.
        first_left = np.full(num_vertices, left.size, dtype=np.int64)
        first_right = np.full(num_vertices, left.size, dtype=np.int64)
        np.minimum.at(first_left, left, position)
        np.minimum.at(first_right, right, position)
        taken = (first_left[left] == position) & (first_right[right] == position)
        right_of[left[taken]] = right[taken]
        left_of[right[taken]] = left[taken]
        alive = (right_of[left] < 0) & (left_of[right] < 0)
        left, right = left[alive], right[alive]
        position = np.arange(left.size)
    return right_of, left_of


def relabel_packs(packs: np.ndarray, overlap: Overlap, num_nodes: int = 1) -> np.ndarray:
    """int64 [B, R, S]: ``packs`` with its ranks permuted to keep the most experts in place.

    Args:
        packs: int64 [B, R, S], a plan whose rank order is free (-1 = empty).
        overlap: :func:`overlap_edges` of ``packs`` and what each new rank held before.
        num_nodes: ranks form ``num_nodes`` blocks of consecutive ranks; a pack moves only with
            its whole node block, so node-local packs stay on one node.
    """
    batch, ranks, _ = packs.shape
    per_node = ranks // num_nodes
    layer, pack, rank, weight = overlap
    node_of_node = np.zeros(batch * num_nodes, dtype=np.int64)  # new node -> old node
    if num_nodes > 1:
        node_pair = (layer * num_nodes + pack // per_node) * num_nodes + rank // per_node
        node_weight = np.bincount(node_pair, weights=weight, minlength=batch * num_nodes**2)
        pairs = np.flatnonzero(node_weight)
        new_node, old_node = np.divmod(pairs, num_nodes)  # new_node: layer * N + node
        old_node += new_node // num_nodes * num_nodes
        matched, _ = greedy_matching(
            new_node, old_node, node_weight[pairs].astype(np.int64), batch * num_nodes
        )
        node_of_node = _complete(matched.reshape(batch, num_nodes), 1) % num_nodes
        inside = node_of_node.ravel()[layer * num_nodes + pack // per_node] == rank // per_node
        layer, pack, rank, weight = layer[inside], pack[inside], rank[inside], weight[inside]
    rank_of, _ = greedy_matching(layer * ranks + pack, layer * ranks + rank, weight, batch * ranks)
    target_node = node_of_node.reshape(batch, num_nodes)
    rank_of_pack = _complete(rank_of.reshape(batch, ranks), per_node, target_node) % ranks
    out = np.empty_like(packs)
    out[np.arange(batch)[:, None], rank_of_pack] = packs
    return out


def _complete(
    matched: np.ndarray, block: int, target_block: np.ndarray | None = None
) -> np.ndarray:
    """int64 [B, n]: the matching ``matched`` [B, n] (flat right vertex ``b * n + j`` or -1)
    with every unmatched left vertex given an unmatched right vertex of the same row, in
    order; with ``target_block`` [B, n / block] the left vertices of block k take right
    vertices of block ``target_block[b, k]`` only (the matching respects blocks)."""
    batch, n = matched.shape
    flat = matched.ravel()
    taken = np.zeros(batch * n, dtype=bool)
    taken[flat[flat >= 0]] = True
    left = np.flatnonzero(flat < 0)
    right = np.flatnonzero(~taken)
    block_of_right = right // block  # row * (n / block) + block
    block_of_left = left // block
    if target_block is not None:
        block_of_left = (left // n) * (n // block) + target_block.ravel()[block_of_left]
    # Both sides sorted by (row, block): the counts agree in every (row, block).
    left = left[np.argsort(block_of_left, kind="stable")]
    right = right[np.argsort(block_of_right, kind="stable")]
    flat = flat.copy()
    flat[left] = right
    return flat.reshape(batch, n)


def align_slots(slots: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """int64 [B, R, S]: each rank's experts reordered so that any it already held keeps its slot.

    Args:
        slots: int64 [B, R, S], no expert twice on one rank.
        kept: int64 [B, R, S], what each slot held before (-1 = nothing).
    """
    shape = slots.shape
    new = slots.reshape(-1, shape[2])
    old = kept.reshape(-1, shape[2])
    match = (new[:, :, None] == old[:, None, :]) & (new >= 0)[:, :, None]
    target = match.argmax(2)  # first old slot of the same expert
    out = np.full_like(new, -1)
    claimed = np.zeros(new.shape, dtype=bool)
    row, item = np.nonzero(match.any(2))
    out[row, target[row, item]] = new[row, item]
    claimed[row, target[row, item]] = True
    # Items not held before fill the unclaimed slots in order; the counts agree per row.
    row, item = np.nonzero(~match.any(2))
    free_row, free_slot = np.nonzero(~claimed)
    out[free_row, free_slot] = new[row, item]
    return out.reshape(shape)
