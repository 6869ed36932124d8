"""How ``execute`` cuts a plan into chunks and lays one chunk out in this rank's buffer.

Pure (no communication, no device work). Every rank cuts the same chunks, from every rank's
estimated cost, so peers post matching transfers; each rank then lays out only its own part.

A chunk's region of the staging buffer holds, 256-byte aligned:

* one send region per destination peer: the rows this rank sends to it, packed so that the whole
  region goes out as one transfer;
* one receive region per source peer, with exactly the same layout as the sender's region;
* the staged local copies (sources that another local copy overwrites).

Inside a peer's region rows are grouped into segments by (layer, kind) in ascending order, and by
plan order within a segment; both ends derive the layout from the same plan, so it matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from elastic_ep.eplb.transfer_plan import LocalCopy, Reload, Step, Transfer, TransferPlan

if TYPE_CHECKING:
    from elastic_ep.eplb.executor import GroupRanks

ALIGN = 256
"""Byte alignment of every segment (NCCL and vectorized copies like aligned buffers)."""


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Segment:
    """``rows`` slots of one (layer, kind), contiguous at ``offset`` in a chunk's region.

    Attributes:
        slots: for a send or staged segment, the source slot of each row; for a receive segment,
            the first destination slot of each row.
    """

    layer: int
    kind: int
    offset: int
    slots: tuple[int, ...]


@dataclass(frozen=True)
class Extra:
    """A destination beyond an op's first: copy row ``row`` of the op's segments to ``slot``."""

    layer: int
    segments: tuple[Segment, ...]  # one per kind
    row: int
    slot: int


@dataclass
class ChunkWork:
    """This rank's part of one chunk (offsets are relative to the chunk's region)."""

    nbytes: int = 0
    sends: list[tuple[int, int, int]] = field(default_factory=list)  # (peer, offset, nbytes)
    recvs: list[tuple[int, int, int]] = field(default_factory=list)
    pack: list[Segment] = field(default_factory=list)  # filled before the transfer
    unpack: list[Segment] = field(default_factory=list)  # written to the weights after it
    extras: list[Extra] = field(default_factory=list)
    direct: list[LocalCopy] = field(default_factory=list)  # slot to slot, before other writes
    reloads: list[Reload] = field(default_factory=list)


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
    """Pack consecutive steps greedily into chunks whose estimated region fits on every rank.

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
    # Every chunk gets the same cap. A first chunk of a quarter (its pack overlaps nothing) was
    # slower on 2x H200: the host, ~0.5 ms per chunk, prepared the second one only after it.
    cap = budget // 2 if overlap else budget
    # Running totals per rank: a chunk [a, b) costs total[b] - total[a], so its end is where the
    # first rank's total passes its start plus the cap (totals never decrease).
    total = np.zeros((len(cost) + 1, world_size), dtype=np.int64)
    np.cumsum(cost, axis=0, out=total[1:])
    chunks: list[Chunk] = []
    start = 0
    while start < len(cost):
        end = min(
            int(np.searchsorted(total[:, g], total[start, g] + cap, side="right")) - 1
            for g in range(world_size)
        )
        end = max(end, start + 1)
        estimate = tuple(int(b) for b in total[end] - total[start])
        chunks.append(Chunk(plan.steps[start:end], estimate))
        start = end
    return chunks


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


def lay_out(
    chunk: Sequence[Step],
    kind_bytes: Sequence[Sequence[int]],
    ranks: GroupRanks,
    old_rank: int | None,
    new_rank: int | None,
) -> ChunkWork:
    """This rank's work for ``chunk``; ``kind_bytes[layer][kind]`` is one slot's exact bytes."""
    sends: dict[int, dict[int, list[Transfer]]] = {}  # peer -> layer -> ops, in plan order
    recvs: dict[int, dict[int, list[Transfer]]] = {}
    staged: dict[int, list[LocalCopy]] = {}
    work = ChunkWork()
    for step in chunk:
        for op in step.ops:
            if isinstance(op, Transfer):
                if op.src == old_rank and old_rank is not None:
                    peer = ranks.new[op.dst]
                    assert peer is not None
                    sends.setdefault(peer, {}).setdefault(op.layer, []).append(op)
                if op.dst == new_rank and new_rank is not None:
                    peer = ranks.old[op.src]
                    assert peer is not None
                    recvs.setdefault(peer, {}).setdefault(op.layer, []).append(op)
            elif op.rank != new_rank or new_rank is None:
                continue
            elif isinstance(op, Reload):
                work.reloads.append(op)
            elif op.staged:
                staged.setdefault(op.layer, []).append(op)
            else:
                work.direct.append(op)
    for peer in sorted(sends):
        start = work.nbytes
        for layer in sorted(sends[peer]):
            ops = sends[peer][layer]
            work.pack.extend(_segments(work, layer, [op.src_slot for op in ops], kind_bytes))
        work.sends.append((peer, start, work.nbytes - start))
    for peer in sorted(recvs):
        start = work.nbytes
        for layer in sorted(recvs[peer]):
            _add_unpack(work, layer, recvs[peer][layer], kind_bytes)
        work.recvs.append((peer, start, work.nbytes - start))
    for layer in sorted(staged):
        ops_ = staged[layer]
        segments = _segments(work, layer, [op.src_slot for op in ops_], kind_bytes)
        work.pack.extend(segments)
        _add_writes(work, layer, segments, ops_)
    return work


def _segments(
    work: ChunkWork, layer: int, slots: list[int], kind_bytes: Sequence[Sequence[int]]
) -> list[Segment]:
    out = []
    for kind, nbytes in enumerate(kind_bytes[layer]):
        out.append(Segment(layer, kind, work.nbytes, tuple(slots)))
        work.nbytes += aligned(nbytes * len(slots))
    return out


def _add_unpack(
    work: ChunkWork, layer: int, ops: list[Transfer], kind_bytes: Sequence[Sequence[int]]
) -> None:
    segments = _segments(work, layer, [op.dst_slots[0] for op in ops], kind_bytes)
    _add_writes(work, layer, segments, ops)


def _add_writes(
    work: ChunkWork, layer: int, segments: list[Segment], ops: Sequence[Transfer | LocalCopy]
) -> None:
    """Rows land in their first destination slot with the segment's copy; any further
    destinations are single-row copies."""
    work.unpack.extend(
        Segment(s.layer, s.kind, s.offset, tuple(op.dst_slots[0] for op in ops)) for s in segments
    )
    for row, op in enumerate(ops):
        work.extras.extend(Extra(layer, tuple(segments), row, slot) for slot in op.dst_slots[1:])
