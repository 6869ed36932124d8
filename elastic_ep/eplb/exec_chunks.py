"""How ``execute`` cuts a plan into chunks that fit the staging buffer.

Pure (no communication, no device work). Every rank cuts the same chunks, from every rank's
estimated cost, so peers post matching transfers; each rank then lays out only its own part
(:mod:`elastic_ep.eplb.exec_layout`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elastic_ep.eplb.exec_ranks import GroupRanks
from elastic_ep.eplb.transfer_plan import Step, TransferPlan

RAMP = 4
"""With overlap, the first and the last chunk are cut to ``1 / RAMP`` of the cap: nothing hides
the first one's pack and the last one's write-back (on 2x H200, ~0.3 ms each for a full chunk)."""


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
    cap = budget // 2 if overlap else budget
    # Running totals per rank: a chunk [a, b) costs total[b] - total[a], so its end is where the
    # first rank's total passes its start plus the cap (totals never decrease).
    total = np.zeros((len(cost) + 1, world_size), dtype=np.int64)
    np.cumsum(cost, axis=0, out=total[1:])
    bounds = [0]
    while bounds[-1] < len(cost):
        start = bounds[-1]
        # Overlapped, the first chunk's pack and the last one's write-back overlap no transfer:
        # both get a fraction of the cap.
        limit = cap // RAMP if overlap and start == 0 else cap
        end = min(
            int(np.searchsorted(total[:, g], total[start, g] + limit, side="right")) - 1
            for g in range(world_size)
        )
        bounds.append(max(end, start + 1))
    if overlap and len(cost) > 1:
        start = bounds[-2]
        tail = max(  # at least the last step
            int(np.searchsorted(total[:, g], total[-1, g] - cap // RAMP, side="left"))
            for g in range(world_size)
        )
        tail = min(tail, len(cost) - 1)
        if start < tail:
            bounds.insert(-1, tail)
    return [
        Chunk(plan.steps[a:b], tuple(int(x) for x in total[b] - total[a]))
        for a, b in itertools.pairwise(bounds)
    ]


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
