"""How ``execute`` cuts a plan into chunks that fit the staging buffer.

Pure (no communication, no device work). Every rank cuts the same chunks, from every rank's
estimated cost, so peers post matching transfers; each rank then lays out only its own part
(:mod:`elastic_ep.eplb.exec_layout`).

The costs are sparse (:class:`StepCosts`: a step's rows on the few group ranks it touches, from
the plan's ``step_experts``), and the cut is greedy: a chunk grows step by step until one more
would take some rank past the cap (one forward pass; then one backward pass for the small tail
of an overlapped run). Each pass runs numpy over windows of rows that double until it stops
inside one, so the work grows with the rows, not with steps x ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elastic_ep.eplb.exec_ranks import GroupRanks
from elastic_ep.eplb.transfer_ops import Step
from elastic_ep.eplb.transfer_plan import TransferPlan

RAMP = 4
"""With overlap, the first and the last chunk are cut to ``1 / RAMP`` of the cap: nothing hides
the first one's pack and the last one's write-back (on 2x H200, ~0.3 ms each for a full chunk)."""


@dataclass(frozen=True)
class Chunk:
    """Consecutive steps run together, and their estimated region bytes.

    Attributes:
        steps: the chunk's steps, in plan order.
        estimate: ``(group rank, bytes)`` pairs, ascending by rank, ranks with none omitted.
    """

    steps: tuple[Step, ...]
    estimate: tuple[tuple[int, int], ...]

    def bytes_on(self, group_rank: int) -> int:
        """The estimated region bytes on ``group_rank`` (0 if it has none in this chunk)."""
        return next((n for g, n in self.estimate if g == group_rank), 0)


@dataclass(frozen=True)
class StepCosts:
    """Estimated region bytes of every step on the group ranks it touches: the rows it sends,
    receives or stages there. Rows sorted by step, then group rank (int64 ``[rows]`` each).

    Attributes:
        start: int64 ``[steps + 1]``: step ``i``'s rows are ``start[i]:start[i + 1]``.
        group_rank: the rank of each row.
        nbytes: its bytes.
    """

    start: np.ndarray
    group_rank: np.ndarray
    nbytes: np.ndarray

    def dense(self, world_size: int) -> np.ndarray:
        """int64 ``[steps, world_size]``: the same costs as a matrix (for small plans)."""
        out = np.zeros((len(self.start) - 1, world_size), dtype=np.int64)
        out[np.repeat(np.arange(len(self.start) - 1), np.diff(self.start)), self.group_rank] = (
            self.nbytes
        )
        return out


def cut_chunks(
    plan: TransferPlan,
    row_bytes: Sequence[int],
    ranks: GroupRanks,
    budget: int,
    overlap: bool,
) -> list[Chunk]:
    """Pack consecutive steps greedily into chunks whose estimated region fits on every rank;
    overlapped, the first chunk and a split-off end of the last get ``1 / RAMP`` of the cap.

    Args:
        row_bytes: per layer, the aligned bytes of one slot of every kind together (an upper
            bound of what one row costs in a region).
        budget: the buffer budget of each rank; with ``overlap`` a chunk gets half of it, so two
            consecutive chunks can be live at once.
    Raises:
        ValueError: a step alone needs more than ``budget`` on some rank (nothing moved yet).
    """
    cost = step_costs(plan, row_bytes, ranks)
    too_big = np.flatnonzero(cost.nbytes > budget)
    if too_big.size:
        i = int(np.searchsorted(cost.start, too_big[0], side="right")) - 1
        a, b = int(cost.start[i]), int(cost.start[i + 1])
        worst = a + int(cost.nbytes[a:b].argmax())
        layer = plan.steps[i].layer
        nbytes = int(cost.nbytes[worst])
        raise ValueError(
            f"buffer_bytes={budget} cannot hold the smallest movable unit of layer {layer}: "
            f"{nbytes // row_bytes[layer]} expert rows ({nbytes} bytes) on "
            f"group rank {int(cost.group_rank[worst])}; nothing was moved"
        )
    cap = budget // 2 if overlap else budget
    steps = len(plan.steps)
    rows = _Rows(cost)
    bounds = [0]
    while bounds[-1] < steps:
        start = bounds[-1]
        # Overlapped, the first chunk's pack and the last one's write-back overlap no transfer:
        # both get a fraction of the cap.
        limit = cap // RAMP if overlap and start == 0 else cap
        bounds.append(max(rows.reach(start, steps, 1, limit), start + 1))
    if overlap and steps > 1:
        start = bounds[-2]
        # The first step from which the rest fits in the small cap on every rank (at least the
        # last step).
        tail = min(rows.reach(steps, start, -1, cap // RAMP), steps - 1)
        if start < tail:
            bounds.insert(-1, tail)
    return [Chunk(plan.steps[a:b], rows.estimate(a, b)) for a, b in itertools.pairwise(bounds)]


def min_buffer_bytes(plan: TransferPlan, row_bytes: Sequence[int], ranks: GroupRanks) -> int:
    """The least ``buffer_bytes`` that runs ``plan`` (one step per chunk, no overlap)."""
    return int(step_costs(plan, row_bytes, ranks).nbytes.max(initial=0))


def step_costs(plan: TransferPlan, row_bytes: Sequence[int], ranks: GroupRanks) -> StepCosts:
    """Every step's estimated region bytes on the group ranks it touches (an old rank and its
    new rank are one group rank: their rows add up)."""
    layer, received, sent = plan.step_experts
    group = [
        np.array([-1 if g is None else g for g in table], dtype=np.int64)
        for table in (ranks.new, ranks.old)
    ]
    step = np.concatenate([received[:, 0], sent[:, 0]])
    rank = np.concatenate([group[0][received[:, 1]], group[1][sent[:, 1]]])
    count = np.concatenate([received[:, 2], sent[:, 2]])
    member = rank >= 0  # execute checked every sender and receiver is a member
    step, rank, count = step[member], rank[member], count[member]
    order = np.lexsort((rank, step))
    step, rank, count = step[order], rank[order], count[order]
    first = np.ones(len(step), dtype=bool)
    first[1:] = (step[1:] != step[:-1]) | (rank[1:] != rank[:-1])
    at = np.flatnonzero(first)
    experts = np.add.reduceat(count, at) if len(at) else count[:0]
    step, rank = step[at], rank[at]
    nbytes = experts * np.asarray(row_bytes, dtype=np.int64)[layer[step]]
    start = np.searchsorted(step, np.arange(len(layer) + 1))
    return StepCosts(start, rank, nbytes)


class _Rows:
    """The greedy passes over the costs' rows, with numpy over growing windows of rows."""

    WINDOW = 4096
    """Rows a pass looks at first; it doubles until the pass stops inside it."""

    def __init__(self, cost: StepCosts) -> None:
        self.start, self.rank, self.nbytes = cost.start, cost.group_rank, cost.nbytes

    def reach(self, at: int, stop: int, direction: int, limit: int) -> int:
        """From step boundary ``at`` towards ``stop`` (``direction`` 1 or -1), the furthest
        boundary such that the steps crossed keep every rank's total within ``limit``."""
        lo, hi = int(self.start[at]), int(self.start[stop])
        window = self.WINDOW
        while True:
            end = lo + direction * window
            end = min(end, hi) if direction > 0 else max(end, hi)
            rows = np.arange(lo, end) if direction > 0 else np.arange(lo - 1, end - 1, -1)
            over = rows[_running_over(self.rank[rows], self.nbytes[rows], limit)]
            if over.size:  # the first step (in pass order) that takes a rank past the limit
                row = int(over.min() if direction > 0 else over.max())
                step = int(np.searchsorted(self.start, row, side="right")) - 1
                return step if direction > 0 else step + 1
            if end == hi:
                return stop
            window *= 2

    def estimate(self, first: int, end: int) -> tuple[tuple[int, int], ...]:
        """``(group rank, bytes)`` of steps ``first`` to ``end`` (exclusive), ascending."""
        a, b = self.start[first], self.start[end]
        order = np.argsort(self.rank[a:b], kind="stable")
        ranks, nbytes = self.rank[a:b][order], self.nbytes[a:b][order]
        at = np.flatnonzero(np.diff(ranks, prepend=-1))
        summed = np.add.reduceat(nbytes, at) if len(at) else nbytes
        return tuple(zip(ranks[at].tolist(), summed.tolist(), strict=True))


def _running_over(rank: np.ndarray, nbytes: np.ndarray, limit: int) -> np.ndarray:
    """bool ``[rows]``: where a rank's running total (in row order) passes ``limit``."""
    order = np.argsort(rank, kind="stable")
    ranks, sizes = rank[order], nbytes[order]
    total = np.cumsum(sizes)
    first = np.ones(len(ranks), dtype=bool)
    first[1:] = ranks[1:] != ranks[:-1]
    # Each rank's rows are consecutive now: subtract the running total before its first row.
    before = np.maximum.accumulate(np.where(first, total - sizes, 0))
    over = np.zeros(len(rank), dtype=bool)
    over[order] = total - before > limit
    return over
