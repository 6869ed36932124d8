"""The order of a transfer plan's steps across layers: every rank's traffic at an even pace.

The executor cuts the plan's step sequence into chunks that fit its buffer, and a chunk lasts
as long as its busiest rank (and its busiest pair of ranks: NCCL splits a rank's channels among
its peers). Chunks of whole layers load one rank more in one chunk and another in the next: on
a 4-rank full reshuffle (26 layers) their busiest ranks summed to 10% more bytes than the
busiest rank's total. Interleaved as here, any run of steps carries about its share of every
rank's sends, receives and pairs (busiest ranks 2% over that total on that plan, busiest pairs
20% lower than with whole layers).

Resources get dense ids in order of first use: only those the plan uses exist, where a
(sender, receiver) pair's id spans ranks x ranks (at 1024 ranks, 2M resources took 28 s and
650 MB to set up for a 6,000-step plan). A pick is then one numpy pass over the uses (what the
steps move, a few per step).

Pure and deterministic (integer inputs, the same float operations on every rank), so every rank
derives the same order.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

Use = tuple[tuple[int, int], ...]
"""What one step moves: ``(resource, items)`` pairs, resources ascending (e.g. a process's sends
or its receives); empty for a step that uses none."""


def interleave_steps(
    uses: Sequence[Sequence[Use]], successors: Sequence[Sequence[Sequence[int]]]
) -> list[tuple[int, int]]:
    """One sequence of every layer's steps, each after its predecessors, every resource
    advancing at the pace of its total.

    Args:
        uses: ``uses[layer][step]``: what the step moves.
        successors: ``successors[layer][step]``: steps of the same layer that may come only after
            it (a graph without cycles).
    Returns:
        ``(layer, step)`` of every step, in order.

    Greedy over the steps whose predecessors are placed: a step that moves nothing first;
    otherwise one whose resources are furthest behind, by the mean over its resources of items
    done minus items due at the overall progress. Ready steps are bucketed by what they use, so
    a pick weighs the buckets, not the steps; within a bucket the lowest (layer, step) goes first.
    """
    kinds: dict[Use, int] = {}
    kind_of = [[kinds.setdefault(use, len(kinds)) for use in layer] for layer in uses]
    ids: dict[int, int] = {}  # resource -> dense id, in order of first use
    kinds_list = [tuple((ids.setdefault(r, len(ids)), n) for r, n in use) for use in kinds]
    steps_of_kind = np.zeros(len(kinds), dtype=np.int64)
    for row in kind_of:
        np.add.at(steps_of_kind, np.asarray(row, dtype=np.int64), 1)
    total = np.zeros(len(ids))
    for k, use in enumerate(kinds_list):
        for r, n in use:
            total[r] += n * steps_of_kind[k]
    everything = total.sum()
    # Per resource, the kinds that use it and the share of each kind's items it is.
    users: list[list[tuple[int, float]]] = [[] for _ in range(len(ids))]
    due = np.zeros(len(kinds))  # a kind's mean items due per unit of overall progress
    for k, use in enumerate(kinds_list):
        size = sum(n for _, n in use)
        for r, n in use:
            users[r].append((k, n / size))
        due[k] = sum(n * total[r] for r, n in use) / max(size, 1)
    user_kind = [np.array([k for k, _ in u], dtype=np.int64) for u in users]
    user_share = [np.array([w for _, w in u]) for u in users]
    free = kinds.get(())
    mean_done = np.zeros(len(kinds))  # a kind's mean items done over its resources
    closed = np.full(len(kinds), np.inf)  # 0 where the kind has a ready step

    ready: list[list[tuple[int, int]]] = [[] for _ in kinds]  # heaps of (layer, step)
    waiting = [[0] * len(layer) for layer in uses]

    def make_ready(layer: int, step: int) -> None:
        kind = kind_of[layer][step]
        heapq.heappush(ready[kind], (layer, step))
        closed[kind] = 0.0

    for layer, after in enumerate(successors):
        for later in after:
            for j in later:
                waiting[layer][j] += 1
        for step, count in enumerate(waiting[layer]):
            if count == 0:
                make_ready(layer, step)

    order: list[tuple[int, int]] = []
    moved = 0.0
    for _ in range(sum(len(layer) for layer in uses)):
        if free is not None and ready[free]:
            kind = free
        else:
            kind = int((mean_done - due * (moved / everything) + closed).argmin())
            for r, n in kinds_list[kind]:
                mean_done[user_kind[r]] += user_share[r] * n
                moved += n
        layer, step = heapq.heappop(ready[kind])
        if not ready[kind]:
            closed[kind] = np.inf
        order.append((layer, step))
        for j in successors[layer][step]:
            waiting[layer][j] -= 1
            if waiting[layer][j] == 0:
                make_ready(layer, j)
    return order
