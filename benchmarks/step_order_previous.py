"""The step order as it was before 2026-12-03, kept to time the current one against: the same
greedy (``elastic_ep.eplb.step_order``), each pick one numpy pass over every kind of step, so a
plan costs steps x kinds (float scores; near-ties may go either way).

    from step_order_previous import interleave_steps
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from elastic_ep.eplb.step_order import Use


def interleave_steps(
    uses: Sequence[Sequence[Use]], successors: Sequence[Sequence[Sequence[int]]]
) -> list[tuple[int, int]]:
    """``elastic_ep.eplb.step_order.interleave_steps``'s order, by an argmin over every kind."""
    kinds: dict[Use, int] = {}
    kind_of = [[kinds.setdefault(use, len(kinds)) for use in layer] for layer in uses]
    ids: dict[int, int] = {}
    kinds_list = [tuple((ids.setdefault(r, len(ids)), n) for r, n in use) for use in kinds]
    steps_of_kind = np.zeros(len(kinds), dtype=np.int64)
    for row in kind_of:
        np.add.at(steps_of_kind, np.asarray(row, dtype=np.int64), 1)
    total = np.zeros(len(ids))
    for k, use in enumerate(kinds_list):
        for r, n in use:
            total[r] += n * steps_of_kind[k]
    everything = total.sum()
    users: list[list[tuple[int, float]]] = [[] for _ in range(len(ids))]
    due = np.zeros(len(kinds))
    for k, use in enumerate(kinds_list):
        size = sum(n for _, n in use)
        for r, n in use:
            users[r].append((k, n / size))
        due[k] = sum(n * total[r] for r, n in use) / max(size, 1)
    user_kind = [np.array([k for k, _ in u], dtype=np.int64) for u in users]
    user_share = [np.array([w for _, w in u]) for u in users]
    free = kinds.get(())
    mean_done = np.zeros(len(kinds))
    closed = np.full(len(kinds), np.inf)
    ready: list[list[tuple[int, int]]] = [[] for _ in kinds]
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
