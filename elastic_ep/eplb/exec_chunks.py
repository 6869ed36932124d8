"""How ``execute`` cuts a plan into chunks that fit the staging buffer.

Pure (no communication, no device work). Every rank cuts the same chunks, from every rank's
estimated cost, so peers post matching transfers; each rank then lays out only its own part
(:mod:`elastic_ep.eplb.exec_layout`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from elastic_ep.eplb.transfer_plan import Step, TransferPlan

if TYPE_CHECKING:
    from elastic_ep.eplb.executor import GroupRanks


RAMP = (4, 2)
"""With overlap, the first chunks get ``1 / 4`` and ``1 / 2`` of the cap, and so do the last
ones (in reverse): nothing hides the first pack and the last write-back, and each transfer must
hide the write-back before it and the pack after it (on 2x H200 a full chunk's pack or
write-back takes ~0.3-0.5 ms beside its ~1.3 ms transfer)."""


@dataclass(frozen=True)
class Chunk:
    """Consecutive steps run together, and the estimated region bytes on every group rank."""

    steps: tuple[Step, ...]
    estimate: tuple[int, ...]


def cut_chunks(
    plan: TransferPlan,
    row_bytes: Sequence[int],
    ranks: GroupRanks,
    world_size: int,
    budget: int,
    overlap: bool,
) -> list[Chunk]:
    """Cut the plan's steps, in order, into chunks whose estimated region fits on every rank.

    Without overlap: greedily, each chunk within ``budget``. With overlap, a chunk gets half of
    it (the cap), so two consecutive chunks can be live at once, and the ends ramp
    (:data:`RAMP`): chunks of at most cap/4 and cap/2 at the start and, mirrored, at the end;
    between them as few chunks as fit the cap, evened out (a sliver of a chunk could not hide the
    write-back before it). A plan too small for both ramps is cut evenly within cap/2, or cap/4.

    Args:
        row_bytes: per layer, the aligned bytes of one slot of every kind together (an upper
            bound of what one row costs in a region).
    Raises:
        ValueError: a step alone needs more than ``budget`` on some rank (nothing moved yet).
    """
    cost = step_costs(plan, row_bytes, ranks, world_size)
    too_big = np.flatnonzero(cost.max(axis=1, initial=0) > budget)
    if too_big.size:
        i = int(too_big[0])
        worst = int(cost[i].argmax())
        layer = plan.steps[i].layer
        raise ValueError(
            f"buffer_bytes={budget} cannot hold the smallest movable unit of layer {layer}: "
            f"{cost[i, worst] // row_bytes[layer]} expert rows ({cost[i, worst]} bytes) on "
            f"group rank {worst}; nothing was moved"
        )
    totals = _Totals(cost)
    steps = len(cost)
    if not overlap:
        bounds = totals.greedy(0, steps, budget)
    else:
        cap = budget // 2
        first, second = (cap // part for part in RAMP)
        head, tail = totals.end(0, first), totals.start(steps, first)
        if head >= tail:
            bounds = totals.even(0, steps, first)
        else:
            head2, tail2 = totals.end(head, second), totals.start(tail, second)
            if head2 >= tail2:
                bounds = [0, *totals.even(head, tail, second), steps]
            else:
                bounds = [0, head, *totals.even(head2, tail2, cap), tail, steps]
    return [
        Chunk(plan.steps[a:b], tuple(int(x) for x in totals.total[b] - totals.total[a]))
        for a, b in itertools.pairwise(bounds)
    ]


class _Totals:
    """Running region bytes per rank over the steps: steps ``[a, b)`` cost ``total[b] -
    total[a]`` (totals never decrease, so chunk ends are binary searches)."""

    def __init__(self, cost: np.ndarray) -> None:
        self.total = np.zeros((len(cost) + 1, cost.shape[1]), dtype=np.int64)
        np.cumsum(cost, axis=0, out=self.total[1:])
        # Every rank's column in one ascending array (column g shifted up by g * lift), so one
        # searchsorted finds a position in every column.
        rows, ranks = self.total.shape
        self.lift = 2 * int(self.total[-1].max(initial=0)) + 1
        self.lifts = np.arange(ranks, dtype=np.int64) * self.lift
        self.starts = np.arange(ranks, dtype=np.int64) * rows
        self.columns = (self.total + self.lifts).T.ravel()

    def end(self, start: int, limit: int) -> int:
        """The furthest end of a chunk from ``start`` within ``limit`` (at least one step)."""
        limit = min(limit, self.lift // 2)  # within a column's lift
        at = np.searchsorted(self.columns, self.total[start] + self.lifts + limit, side="right")
        return max(int((at - self.starts).min()) - 1, start + 1)

    def start(self, end: int, limit: int) -> int:
        """The earliest start of a chunk up to ``end`` within ``limit`` (at least one step)."""
        limit = min(limit, self.lift // 2)
        at = np.searchsorted(self.columns, self.total[end] + self.lifts - limit, side="left")
        return min(int((at - self.starts).max()), end - 1)

    def greedy(self, start: int, stop: int, limit: int) -> list[int]:
        """Bounds of chunks each as long as ``limit`` allows, from ``start`` to ``stop``."""
        bounds = [start]
        while bounds[-1] < stop:
            bounds.append(min(self.end(bounds[-1], limit), stop))
        return bounds

    def even(self, start: int, stop: int, limit: int) -> list[int]:
        """Bounds of as few chunks within ``limit`` as the greedy cut, under the lowest common
        limit that keeps their number (to 1/64 of ``limit``)."""
        bounds = self.greedy(start, stop, limit)
        chunks = len(bounds) - 1
        low = int(max(self.total[stop] - self.total[start])) // max(chunks, 1)
        high = limit
        while high - low > limit // 64:
            middle = (low + high) // 2
            trial = self.greedy(start, stop, middle)
            if len(trial) - 1 <= chunks:
                high, bounds = middle, trial
            else:
                low = middle
        return bounds


def min_buffer_bytes(
    plan: TransferPlan, row_bytes: Sequence[int], ranks: GroupRanks, world_size: int
) -> int:
    """The least ``buffer_bytes`` that runs ``plan`` (one step per chunk, no overlap)."""
    return int(step_costs(plan, row_bytes, ranks, world_size).max(initial=0))


def step_costs(
    plan: TransferPlan, row_bytes: Sequence[int], ranks: GroupRanks, world_size: int
) -> np.ndarray:
    """Estimated region bytes of every step on every group rank, int64 ``[steps, world_size]``:
    the rows it sends, receives or stages there."""
    layer, received, sent = plan.step_experts
    experts = np.zeros((len(layer), world_size), dtype=np.int64)
    for table, counts in ((ranks.new, received), (ranks.old, sent)):
        for rank, g in enumerate(table):
            if g is not None:  # execute checked every sender and receiver is a member
                experts[:, g] += counts[:, rank]
    return experts * np.asarray(row_bytes, dtype=np.int64)[layer][:, None]
