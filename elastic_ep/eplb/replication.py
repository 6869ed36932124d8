"""How many replicas each logical expert gets.

The rule is the greedy one of DeepSeek's EPLB (give the next slot to the expert with the highest
load per replica), which minimises the largest load per replica. Giving expert e its k-th extra
replica has priority ``load[e] / k``, and these priorities fall with k, so the greedy result is
one replica each plus the ``M = slots - E`` highest priorities. They are found with one sort per
row instead of a per-slot loop: if the expert of load rank i (heaviest first) gets k extras, so
does every heavier one, so ``(i + 1) * k <= M`` and only ``~M log M`` candidates can win.
"""

from __future__ import annotations

import numpy as np

_PARTITION_FROM = 4096  # candidates per row from which a partition beats the integer sort


def replica_counts(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """int64 [B, E]: replicas per expert, >= 1 each, <= ``max_replicas``, summing to
    ``min(num_slots, E * max_replicas)`` in every row.

    Args:
        load: float64 [B, E], finite and non-negative. A row of zeros is treated as uniform.
        num_slots: slots to fill per row (>= E).
        max_replicas: most replicas one expert may get (the number of ranks, since two replicas
            of one expert never share a rank).
    """
    rows, num_experts = load.shape
    extra = min(num_slots, num_experts * max_replicas) - num_experts
    if extra == 0:
        return np.ones((rows, num_experts), dtype=np.int64)
    idle = load.sum(1) == 0
    if idle.any():
        load = np.where(idle[:, None], 1.0, load)
    contenders = min(extra, num_experts)
    heaviest = descending_order(load)[:, :contenders] + np.arange(rows)[:, None] * num_experts
    top = load.ravel()[heaviest]  # [B, contenders], heaviest first
    # Candidate (i, k): the k-th extra replica of the expert of load rank i, grouped by i.
    per_expert = np.minimum(extra // np.arange(1, contenders + 1), max_replicas - 1)
    rank_of = np.repeat(np.arange(contenders), per_expert)
    starts = np.cumsum(per_expert) - per_expert
    kth = np.arange(rank_of.size) - starts[rank_of] + 1
    priority = top[:, rank_of] / kth  # [B, C]; falls with k and with i
    # The extra-th largest priority, by an integer sort (see ``descending_order``); a
    # partition where the candidates are many (linear instead of n log n).
    keys = priority.view(np.int64)
    width = keys.shape[1]
    if width > _PARTITION_FROM:
        cutoff = np.partition(keys, width - extra, axis=1)[:, width - extra, None]
    else:
        cutoff = np.sort(keys, axis=1)[:, -extra, None]
    cutoff = cutoff.view(np.float64)
    chosen = priority > cutoff
    tied = priority == cutoff
    wanted = extra - chosen.sum(1, keepdims=True)
    if (tied.sum(1, keepdims=True) > wanted).any():
        # Exact ties at the cutoff (integer or Zipf loads): lowest k first, then the heavier
        # expert, so that the tied replicas go to as many experts as possible.
        tie_order = kth * rank_of.size + np.arange(rank_of.size)
        tie_key = np.sort(np.where(tied, tie_order, np.iinfo(np.int64).max), axis=1)
        last = np.take_along_axis(tie_key, np.maximum(wanted - 1, 0), axis=1)
        tied &= (tie_order <= last) & (wanted > 0)
    chosen |= tied
    extras = np.bincount(heaviest[:, rank_of][chosen], minlength=rows * num_experts)
    return extras.reshape(rows, num_experts) + 1


def descending_order(values: np.ndarray) -> np.ndarray:
    """int64 [B, N]: column indices of every row of ``values`` (float64 [B, N], >= 0), largest
    first; lowest index first among values equal but for the last log2(N) bits.

    One integer sort: a non-negative float's bit pattern orders like the float, so the low bits
    can carry the column index (numpy's float argsort is several times slower).
    """
    width = values.shape[1]
    bits = max(1, (width - 1).bit_length())
    low = (1 << bits) - 1
    keys = np.arange(width) - (values.view(np.int64) | low)  # negated; index in the low bits
    keys.sort(axis=1)
    return low - (-keys & low)


def ascending_order(values: np.ndarray) -> np.ndarray:
    """int64 [B, N]: column indices of every row of ``values`` (float64 [B, N], >= 0), smallest
    first; lowest index first among values equal but for the last log2(N) bits."""
    width = values.shape[1]
    low = (1 << max(1, (width - 1).bit_length())) - 1
    keys = (values.view(np.int64) & ~low) | np.arange(width)
    keys.sort(axis=1)
    return keys & low
