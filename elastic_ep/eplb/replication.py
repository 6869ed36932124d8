"""How many replicas each logical expert gets.

The rule is the greedy one of DeepSeek's EPLB (give the next slot to the expert with the highest
load per replica), which minimises the largest load per replica. It is computed without the
per-slot loop: a bisection finds, for every layer at once, the threshold ``t`` such that
``ceil(load / t)`` replicas fill the slots, and a few greedy steps place the ties left over.
"""

from __future__ import annotations

import numpy as np

_BISECTION_STEPS = 7


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
    total = min(num_slots, num_experts * max_replicas)
    load = np.where(load.sum(1, keepdims=True) > 0, load, 1.0)
    if total == num_experts:
        return np.ones((rows, num_experts), dtype=np.int64)
    # Bracket the threshold: at t = sum(load) / (total - E) even ceil(load / t) <= load / t + 1
    # fits; below sum(load) / total nothing fits unless the replica cap binds.
    layer_load = load.sum(1)
    hi = np.minimum(layer_load / (total - num_experts), load.max(1))
    capped = load.max(1) > max_replicas * layer_load / total
    lo = np.where(capped, 0.0, layer_load / total)
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        fits = _counts_at(load, mid, max_replicas).sum(1) <= total
        hi = np.where(fits, mid, hi)
        lo = np.where(fits, lo, mid)
    counts = _counts_at(load, hi, max_replicas).astype(np.int64)
    # Ties at the threshold: hand the last slots out one at a time, highest load per replica
    # first (lowest expert id on exact ties), exactly as the greedy rule would.
    row_idx = np.arange(rows)
    while True:
        short = total - counts.sum(1)
        if not short.any():
            return counts
        per_replica = np.where(counts < max_replicas, load / counts, -np.inf)
        pick = per_replica.argmax(1)
        counts[row_idx, pick] += (short > 0).astype(np.int64)


def _counts_at(load: np.ndarray, threshold: np.ndarray, max_replicas: int) -> np.ndarray:
    """float64 [B, E]: fewest replicas that bring every load per replica to <= threshold[b]."""
    need = np.ceil(load * (1.0 / threshold)[:, None])
    return np.clip(need, 1, max_replicas, out=need)
