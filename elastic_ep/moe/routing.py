"""Logical top-k expert ids -> physical slots, through the current placement.

Spread rule (deterministic, balanced): the pairs ``(token t, choice k)`` of one batch that chose
logical expert ``e`` are numbered ``j = 0, 1, ...`` in token-major order (t, then k). Pair ``j``
goes to replica ``(j + rank_offset) % logcnt[e]`` of ``e``, i.e. slot ``log2phy[e, replica]``.
Within a batch every expert's pairs are therefore split over its replicas with counts differing
by at most one, and ``rank_offset`` (the EP rank) rotates which replicas get the extra pairs, so
ranks that each route one token to a hot expert do not all pick its first replica.

Everything is tensor ops on the routing tables (no host sync, no data-dependent shapes), so it
works on the fixed-address :class:`~elastic_ep.eplb.PlacementBuffers` tensors inside a captured
CUDA graph.
"""

from __future__ import annotations

import torch


def route_to_slots(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    *,
    rank_offset: int = 0,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Physical slot for every (token, choice) pair of one layer.

    The pairs that chose expert ``e`` get ordinals ``j = start[e], start[e] + 1, ...`` in order,
    and pair ``j`` goes to entry ``(j + rank_offset) % logcnt[e]`` of ``log2phy[e]``: each
    expert's pairs are split over its row entries exactly (counts differ by at most one).

    Args:
        topk_ids: int64 [T, K] logical expert ids in ``[0, E)`` (not range-checked: that would
            need a host sync; an out-of-range id raises an indexing error).
        log2phy: int64 [E, max_replicas] this layer's replica slots, -1 padded.
        logcnt: int64 [E] this layer's replica counts.
        rank_offset: rotates the replica choice (pass the EP rank).
        start: int64 [E] first ordinal per expert (default 0); the routing kernel's running
            counters (``route_kernel.running_counters``) before a launch reproduce that launch.
    Returns:
        int64 [T, K] physical slot ids (rank-major numbering); -1 where the expert has no replica.
    """
    if topk_ids.dtype != torch.int64 or topk_ids.dim() != 2:
        raise TypeError(
            f"topk_ids must be int64 [T, K], got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if log2phy.dtype != torch.int64 or log2phy.dim() != 2:
        raise TypeError(f"log2phy must be int64 [E, R], got {log2phy.dtype} {tuple(log2phy.shape)}")
    if logcnt.dtype != torch.int64 or logcnt.shape != log2phy.shape[:1]:
        raise TypeError(
            f"logcnt must be int64 [{log2phy.shape[0]}], got {logcnt.dtype} {tuple(logcnt.shape)}"
        )
    if not isinstance(rank_offset, int) or rank_offset < 0:
        raise ValueError(f"rank_offset must be a non-negative int, got {rank_offset!r}")
    if start is not None and (start.dtype != torch.int64 or start.shape != logcnt.shape):
        raise TypeError(
            f"start must be int64 [{logcnt.shape[0]}], got {start.dtype} {tuple(start.shape)}"
        )
    flat = topk_ids.reshape(-1)
    ordinal = _ordinal_within_expert(flat, log2phy.shape[0])
    if start is not None:
        ordinal = ordinal + start[flat]
    replica = (ordinal + rank_offset) % logcnt[flat].clamp(min=1)
    return log2phy[flat, replica].view_as(topk_ids)


def _ordinal_within_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [N]: how many earlier entries of ``ids`` hold the same expert id."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    run_start = torch.cumsum(counts, 0) - counts
    order = torch.sort(ids, stable=True).indices
    ordinal = torch.empty_like(ids)
    ordinal[order] = torch.arange(ids.numel(), device=ids.device) - run_start[ids[order]]
    return ordinal


def count_slot_tokens_(counts: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Add the number of pairs routed to each slot into ``counts``, in place; -1 slots are skipped.

    Args:
        counts: [capacity] integer tensor (e.g. a row of a fixed-address int32 buffer).
        slot_ids: int64 [T, K] physical slots from :func:`route_to_slots`, each ``< capacity``.
    Returns:
        ``counts``.
    """
    flat = slot_ids.reshape(-1)
    valid = flat >= 0
    counts.scatter_add_(0, torch.where(valid, flat, 0), valid.to(counts.dtype))
    return counts
