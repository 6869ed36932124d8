"""The order of a transfer plan's steps across layers: every rank's traffic at an even pace.

The executor cuts the plan's step sequence into chunks that fit its buffer, and a chunk lasts
as long as its busiest rank (and its busiest pair of ranks: NCCL splits a rank's channels among
its peers). Chunks of whole layers load one rank more in one chunk and another in the next: on
a 4-rank full reshuffle (26 layers) their busiest ranks summed to 10% more bytes than the
busiest rank's total. Interleaved as here, any run of steps carries about its share of every
rank's sends, receives and pairs.

The merge is greedy: each pick takes a ready step (its predecessors placed) whose resources are
least advanced, by the mean over the step's items of its resources' progress (items placed over
the resource's total). Progress only grows, so a ready step's key only grows: keys sit in one
heap, and a popped key that has gone stale is recomputed and pushed back (lazy evaluation), which
makes a pick cost a few heap operations rather than a pass over every ready step. The cost grows
about as ``steps x log(steps)``: the same per step at 1024 ranks as at 8.

Pure and deterministic (integer inputs, the same float operations on every rank), so every rank
derives the same order.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Sequence

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

    A ready step that moves nothing goes first (lowest ``(layer, step)`` first); otherwise a
    ready step of the use with the least key ``sum(items * done[r]) / sum(items * total[r])``
    over its resources ``r`` (the share of their traffic already placed), ties to the lowest
    ``(layer, step)``. Ready steps are bucketed by what they use, so the heap holds uses.
    """
    kinds: dict[Use, int] = {}
    kind_of = [[kinds.setdefault(use, len(kinds)) for use in layer] for layer in uses]
    ids: dict[int, int] = {}  # resource -> dense id
    kind_items = [tuple((ids.setdefault(r, len(ids)), n) for r, n in use) for use in kinds]
    kind_res = [tuple(r for r, _ in items) for items in kind_items]
    kind_n = [tuple(n for _, n in items) for items in kind_items]
    total = [0] * len(ids)
    for row in kind_of:
        for kind in row:
            for r, n in kind_items[kind]:
                total[r] += n
    due = [sum(n * total[r] for r, n in items) for items in kind_items]
    done = [0] * len(ids)
    free = kinds.get(())

    def key(kind: int) -> float:
        items = map(operator.mul, kind_n[kind], map(done.__getitem__, kind_res[kind]))
        return sum(items) / due[kind]

    bucket: list[list[tuple[int, int]]] = [[] for _ in kind_items]  # heaps of ready steps
    version = [0] * len(kind_items)
    picks: list[tuple[float, int, int, int, int]] = []  # (key, layer, step, kind, version)

    def offer(kind: int) -> None:
        """Push the kind's first ready step with the kind's key now (older entries lapse)."""
        version[kind] += 1
        layer, step = bucket[kind][0]
        heapq.heappush(picks, (key(kind), layer, step, kind, version[kind]))

    def make_ready(layer: int, step: int) -> None:
        kind = kind_of[layer][step]
        heapq.heappush(bucket[kind], (layer, step))
        if kind != free and bucket[kind][0] == (layer, step):
            offer(kind)

    waiting = [[0] * len(layer) for layer in uses]
    for layer, after in enumerate(successors):
        for later in after:
            for j in later:
                waiting[layer][j] += 1
        for step, count in enumerate(waiting[layer]):
            if count == 0:
                make_ready(layer, step)

    order: list[tuple[int, int]] = []
    while picks or (free is not None and bucket[free]):
        if free is not None and bucket[free]:
            kind = free
        else:
            pushed, layer, step, kind, v = heapq.heappop(picks)
            if v != version[kind]:
                continue
            now = key(kind)
            # Its resources advanced since it was offered: offer it again, unless it still
            # comes first (every other entry's key is a lower bound of its own: keys only grow).
            if now != pushed and picks and (now, layer, step) > picks[0][:3]:
                offer(kind)
                continue
            for r, n in kind_items[kind]:
                done[r] += n
        layer, step = heapq.heappop(bucket[kind])
        if kind != free:
            version[kind] += 1
            if bucket[kind]:
                offer(kind)
        order.append((layer, step))
        for j in successors[layer][step]:
            waiting[layer][j] -= 1
            if waiting[layer][j] == 0:
                make_ready(layer, j)
    return order
