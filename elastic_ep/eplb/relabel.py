"""Relabel a fresh plan onto the previous one: which new pack becomes which rank.

A static plan only says which experts share a rank, not which rank. Choosing, for every pack,
the rank that already holds the most of its experts is an assignment problem; it is solved
exactly by a Hungarian algorithm batched over layers (and, for hierarchical plans, over nodes).
"""

from __future__ import annotations

import numpy as np


def max_weight_matching(score: np.ndarray) -> np.ndarray:
    """int64 [B, n]: column matched to each row, maximising the total score of every batch.

    Args:
        score: float64 [B, n, n] (rows = packs, columns = ranks).

    Shortest augmenting paths with potentials (the O(n^3) Hungarian method), with every step
    applied to all batches still searching at once.
    """
    batch, n, _ = score.shape
    cost = -np.asarray(score, dtype=np.float64)
    u = np.zeros((batch, n + 1))
    v = np.zeros((batch, n + 1))
    row_of_col = np.zeros((batch, n + 1), dtype=np.int64)  # 1-based row, 0 = unmatched
    way = np.zeros((batch, n + 1), dtype=np.int64)
    all_b = np.arange(batch)
    for row in range(1, n + 1):
        row_of_col[:, 0] = row
        col = np.zeros(batch, dtype=np.int64)
        min_slack = np.full((batch, n + 1), np.inf)
        used = np.zeros((batch, n + 1), dtype=bool)
        searching = all_b
        while searching.size:
            b = searching
            used[b, col[b]] = True
            r = row_of_col[b, col[b]]
            slack = cost[b, r - 1, :] - u[b, r][:, None] - v[b, 1:]
            free = ~used[b, 1:]
            better = free & (slack < min_slack[b, 1:])
            min_slack[b, 1:] = np.where(better, slack, min_slack[b, 1:])
            way[b, 1:] = np.where(better, col[b][:, None], way[b, 1:])
            candidate = np.where(free, min_slack[b, 1:], np.inf)
            nxt = candidate.argmin(1) + 1
            delta = candidate[np.arange(b.size), nxt - 1]
            used_b = used[b]
            matched_rows = np.where(used_b, row_of_col[b], 0)
            # Matched rows are distinct; unmatched columns all point at the unused row 0.
            u[b[:, None], matched_rows] += np.where(used_b, delta[:, None], 0.0)
            v[b] -= np.where(used_b, delta[:, None], 0.0)
            min_slack[b] -= np.where(used_b, 0.0, delta[:, None])
            col[b] = nxt
            searching = b[row_of_col[b, nxt] != 0]
        # Flip the augmenting path of every batch.
        while (col != 0).any():
            b = np.flatnonzero(col)
            prev = way[b, col[b]]
            row_of_col[b, col[b]] = row_of_col[b, prev]
            col[b] = prev
    col_of_row = np.empty((batch, n), dtype=np.int64)
    col_of_row[all_b[:, None], row_of_col[:, 1:] - 1] = np.arange(n)
    return col_of_row


def overlap_of(packs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """float64 [B, R, R]: experts pack p shares with what rank r held (both [B, R, S])."""
    num_experts = int(max(packs.max(), kept.max())) + 1
    now = _presence(packs, num_experts).astype(np.float32)
    before = _presence(kept, num_experts).astype(np.float32)
    return np.matmul(now, before.transpose(0, 2, 1)).astype(np.float64)


def relabel_cost_floor(packs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """int64 [B]: a lower bound on the weights received after :func:`relabel_packs` (each pack
    on the rank it overlaps most, ignoring that two packs may want the same rank)."""
    sizes = (packs >= 0).sum((1, 2))
    return sizes - overlap_of(packs, kept).max(2).sum(1).astype(np.int64)


def relabel_packs(packs: np.ndarray, kept: np.ndarray, num_nodes: int = 1) -> np.ndarray:
    """int64 [B, R, S]: ``packs`` with its ranks permuted to keep the most experts in place.

    Args:
        packs: int64 [B, R, S], a plan whose rank order is free (-1 = empty).
        kept: int64 [B, R, S], what each new rank held before (-1 = nothing, e.g. joined).
        num_nodes: ranks form ``num_nodes`` blocks of consecutive ranks; a pack moves only with
            its whole node block, so node-local packs stay on one node.
    """
    batch, ranks, _ = packs.shape
    overlap = overlap_of(packs, kept)
    per_node = ranks // num_nodes
    # Best rank matching inside every (new node block, old node block) pair, then nodes.
    blocks = overlap.reshape(batch, num_nodes, per_node, num_nodes, per_node).transpose(
        0, 1, 3, 2, 4
    )
    inner = max_weight_matching(blocks.reshape(-1, per_node, per_node))
    inner_value = np.take_along_axis(
        blocks.reshape(-1, per_node, per_node), inner[:, :, None], axis=2
    ).sum((1, 2))
    node_of_block = max_weight_matching(inner_value.reshape(batch, num_nodes, num_nodes))
    inner = inner.reshape(batch, num_nodes, num_nodes, per_node)
    chosen = np.take_along_axis(inner, node_of_block[:, :, None, None], axis=2)[:, :, 0]
    rank_of_pack = (node_of_block[:, :, None] * per_node + chosen).reshape(batch, ranks)
    out = np.empty_like(packs)
    out[np.arange(batch)[:, None], rank_of_pack] = packs
    return out


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


def _presence(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [B, R, E]: whether rank r holds expert e (empty slots ignored)."""
    batch, ranks, _ = slots.shape
    present = np.zeros((batch, ranks, num_experts + 1), dtype=bool)
    present[np.arange(batch)[:, None, None], np.arange(ranks)[None, :, None], slots + 1] = True
    return present[:, :, 1:]
