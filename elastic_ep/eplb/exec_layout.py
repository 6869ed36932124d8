"""Where every byte of every chunk goes on this rank: the executor's layout, with numpy.

Pure (no communication, no device work). Every rank lays out every chunk at the start of a call,
from the plan's :class:`~elastic_ep.eplb.transfer_ops.OpTable`, in a few dozen array operations
whatever the number of ops (a Python loop over the ops cost ~0.3 ms per chunk of host time on an
H200 machine, while the previous chunk's transfer ran).

A chunk's region of the staging buffer holds, 256-byte aligned:

* one send region per destination peer (ascending): the rows this rank sends to it, packed so
  that the whole region goes out as one transfer;
* one receive region per source peer (ascending), with exactly the layout of the sender's region;
* the staged local copies (sources that another local copy overwrites).

Inside a region rows are grouped into segments by (layer, kind) in ascending order, and by plan
order within a segment; both ends derive the layout from the same plan, so it matches. Even
chunks sit at the start of the buffer and odd chunks at its end (see the executor).

Rows name their tensors by number: 0 is the staging buffer, ``1 + layer * kinds + kind`` is
``weights[layer][kind]`` (``kinds``: the most kinds any layer has); offsets are in bytes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from elastic_ep.eplb.exec_ranks import GroupRanks
from elastic_ep.eplb.transfer_ops import OpTable, Reload
from elastic_ep.eplb.transfer_plan import TransferPlan

ALIGN = 256
"""Byte alignment of every segment (NCCL and vectorized copies like aligned buffers)."""

BUFFER = 0
"""Tensor number of the staging buffer in a :class:`RowSet`."""

_SEND, _RECEIVE, _STAGE = 0, 1, 2  # sections of a chunk's region, in region order


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class RowSet:
    """Byte rows of one kind of launch for every chunk, chunk after chunk (int64 ``[rows]``
    each); a chunk's rows are copied by one launch, in no particular order.

    Attributes:
        src_tensor / dst_tensor: tensor numbers (see the module docstring).
        src_offset / dst_offset: byte offsets in those tensors.
        nbytes: bytes of each row.
        bounds: int64 ``[chunks + 1]``: chunk ``c``'s rows are ``bounds[c]:bounds[c + 1]``.
    """

    src_tensor: np.ndarray
    src_offset: np.ndarray
    dst_tensor: np.ndarray
    dst_offset: np.ndarray
    nbytes: np.ndarray
    bounds: np.ndarray

    def of_chunk(self, chunk: int) -> RowSet:
        """The rows of one chunk."""
        a, b = self.bounds[chunk], self.bounds[chunk + 1]
        return RowSet(
            self.src_tensor[a:b],
            self.src_offset[a:b],
            self.dst_tensor[a:b],
            self.dst_offset[a:b],
            self.nbytes[a:b],
            np.array([0, b - a]),
        )


@dataclass(frozen=True)
class ChunkLayout:
    """This rank's part of one chunk (its rows are in :class:`Layout`).

    Attributes:
        nbytes: bytes of its region; ``base``: where the region starts in the buffer.
        sends / recvs: ``(peer group rank, buffer offset, bytes)`` of each transfer.
        reloads: the plan's reloads for this rank in this chunk.
    """

    nbytes: int
    base: int
    sends: tuple[tuple[int, int, int], ...]
    recvs: tuple[tuple[int, int, int], ...]
    reloads: tuple[Reload, ...]


@dataclass(frozen=True)
class Layout:
    """This rank's layout of consecutive chunks of a call.

    Attributes:
        chunks: per chunk, its region and transfers (row bounds count from the first).
        pack: rows into each region before its transfers (sends and staged copies).
        direct: slot-to-slot local copies, run after the transfers but before ``unpack`` (their
            sources may be overwritten by the chunk's other writes, never by each other).
        unpack: rows out of each region into their slots after its transfers.
    """

    chunks: tuple[ChunkLayout, ...]
    pack: RowSet
    direct: RowSet
    unpack: RowSet


def kinds_of(kind_bytes: Sequence[Sequence[int]]) -> int:
    """The most weight kinds any layer has (the stride of tensor numbers)."""
    return max((len(layer) for layer in kind_bytes), default=0)


def lay_out_chunks(
    plan: TransferPlan,
    chunk_starts: Sequence[int],
    kind_bytes: Sequence[Sequence[int]],
    ranks: GroupRanks,
    old_rank: int | None,
    new_rank: int | None,
    buffer_bytes: int,
    first: int = 0,
    last: int | None = None,
) -> Layout:
    """This rank's layout of chunks ``first`` to ``last`` (exclusive; default: to the end).

    Args:
        chunk_starts: index in ``plan.steps`` of each chunk's first step, then the step count.
        kind_bytes: ``kind_bytes[layer][kind]``: one slot's exact bytes.
        old_rank / new_rank: this process's ranks (``None`` if not one).
        buffer_bytes: the staging buffer's size (odd chunks end at its end).
    """
    if last is None:
        last = len(chunk_starts) - 1
    chunks = last - first
    ops = _ops_between(plan.op_table, chunk_starts[first], chunk_starts[last])
    kinds = kinds_of(kind_bytes)
    slot_bytes = np.zeros((len(kind_bytes), kinds), dtype=np.int64)  # [layers, kinds]
    for i, per_kind in enumerate(kind_bytes):
        slot_bytes[i, : len(per_kind)] = per_kind
    chunk_of_op = np.searchsorted(np.asarray(chunk_starts), ops.step, side="right") - 1 - first
    old_group = np.array([-1 if g is None else g for g in ranks.old], dtype=np.int64)
    new_group = np.array([-1 if g is None else g for g in ranks.new], dtype=np.int64)
    me_old = -1 if old_rank is None else old_rank
    me_new = -1 if new_rank is None else new_rank
    local = ~ops.transfer & (ops.dst == me_new)

    # One entry per op this rank packs or unpacks: sends, receives, staged local copies.
    picked = [
        np.flatnonzero(ops.transfer & (ops.src == me_old)),
        np.flatnonzero(ops.transfer & (ops.dst == me_new)),
        np.flatnonzero(local & ops.staged),
    ]
    op = np.concatenate(picked)
    section = np.repeat(np.arange(3), [len(p) for p in picked])
    peer = np.concatenate(
        [new_group[ops.dst[picked[0]]], old_group[ops.src[picked[1]]], np.zeros_like(picked[2])]
    )
    chunk, layer = chunk_of_op[op], ops.layer[op]
    order = np.lexsort((op, layer, peer, section, chunk))
    op, section, peer, chunk, layer = (a[order] for a in (op, section, peer, chunk, layer))

    # Segments: one per (chunk, section, peer, layer) group and kind, in that order.
    entries = len(op)
    starts_group = _run_starts(chunk, section, peer, layer)
    group = np.cumsum(starts_group) - 1
    group_start = np.flatnonzero(starts_group)
    count = np.diff(np.append(group_start, entries))
    row = np.arange(entries) - group_start[group]
    segment = (
        -(-slot_bytes[layer[group_start]] * count[:, None] // ALIGN) * ALIGN
    )  # [groups, kinds]
    sizes = segment.ravel()
    segment_chunk = np.repeat(chunk[group_start], kinds)
    at = np.cumsum(sizes) - sizes
    chunk_first_segment = np.searchsorted(segment_chunk, np.arange(chunks))
    chunk_at = np.append(at, sizes.sum())[chunk_first_segment]
    offset = (at - chunk_at[segment_chunk]).reshape(segment.shape)  # in its chunk's region
    nbytes = np.bincount(segment_chunk, weights=sizes, minlength=chunks).astype(np.int64)
    base = np.where((first + np.arange(chunks)) % 2 == 0, 0, buffer_bytes - nbytes)

    # Rows of every entry and kind: [entries, kinds].
    size = slot_bytes[layer]
    in_buffer = base[chunk][:, None] + offset[group] + row[:, None] * size
    weight = 1 + layer[:, None] * kinds + np.arange(kinds)
    read = np.where(section == _RECEIVE, -1, ops.src_slot[op])[:, None] * size
    written = ops.dst_slot[op][:, None] * size
    rows: dict[str, list[tuple[np.ndarray, ...]]] = {"pack": [], "direct": [], "unpack": []}
    into = section != _RECEIVE
    rows["pack"].append(
        _rows(weight[into], read[into], BUFFER, in_buffer[into], size[into], chunk[into])
    )
    out = section != _SEND
    rows["unpack"].append(
        _rows(BUFFER, in_buffer[out], weight[out], written[out], size[out], chunk[out])
    )
    # Further destinations of received and staged rows: copies from the same buffer rows.
    entry_of_op = np.full(len(ops.step), -1, dtype=np.int64)
    entry_of_op[op[out]] = np.flatnonzero(out)
    extra = entry_of_op[ops.extra_op]
    has = extra >= 0
    e, slots = extra[has], ops.extra_slot[has]
    rows["unpack"].append(
        _rows(BUFFER, in_buffer[e], weight[e], slots[:, None] * size[e], size[e], chunk[e])
    )
    # Slot-to-slot local copies, to every destination slot.
    direct = local & ~ops.staged
    d = np.flatnonzero(direct)
    d_extra = direct[ops.extra_op]
    targets = np.concatenate([d, ops.extra_op[d_extra]])
    target_slots = np.concatenate([ops.dst_slot[d], ops.extra_slot[d_extra]])
    d_size = slot_bytes[ops.layer[targets]]
    d_weight = 1 + ops.layer[targets][:, None] * kinds + np.arange(kinds)
    rows["direct"].append(
        _rows(
            d_weight,
            ops.src_slot[targets][:, None] * d_size,
            d_weight,
            target_slots[:, None] * d_size,
            d_size,
            chunk_of_op[targets],
        )
    )
    transfers = _transfers(
        chunk[group_start], section[group_start], peer[group_start], offset, segment, base
    )
    reloads = _reloads(plan, chunk_starts[first : last + 1], new_rank)
    return Layout(
        tuple(
            ChunkLayout(int(nbytes[c]), int(base[c]), *transfers[c], reloads[c])
            for c in range(chunks)
        ),
        *(_by_chunk(rows[name], chunks) for name in ("pack", "direct", "unpack")),
    )


def _run_starts(*keys: np.ndarray) -> np.ndarray:
    """bool ``[n]``: where a run of equal keys (sorted rows, every key equal) starts."""
    starts = np.zeros(len(keys[0]), dtype=bool)
    starts[:1] = True
    for key in keys:
        starts[1:] |= key[1:] != key[:-1]
    return starts


def _ops_between(ops: OpTable, first_step: int, end_step: int) -> OpTable:
    """The ops of steps ``first_step`` to ``end_step`` (exclusive), numbered from 0."""
    lo, hi = np.searchsorted(ops.step, [first_step, end_step])
    extra_lo, extra_hi = np.searchsorted(ops.extra_op, [lo, hi])
    return OpTable(
        step=ops.step[lo:hi],
        layer=ops.layer[lo:hi],
        transfer=ops.transfer[lo:hi],
        src=ops.src[lo:hi],
        src_slot=ops.src_slot[lo:hi],
        dst=ops.dst[lo:hi],
        dst_slot=ops.dst_slot[lo:hi],
        staged=ops.staged[lo:hi],
        extra_op=ops.extra_op[extra_lo:extra_hi] - lo,
        extra_slot=ops.extra_slot[extra_lo:extra_hi],
    )


def _rows(
    src_tensor: np.ndarray | int,
    src_offset: np.ndarray,
    dst_tensor: np.ndarray | int,
    dst_offset: np.ndarray,
    nbytes: np.ndarray,
    chunk: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Rows from ``[n, kinds]`` arrays (a tensor number may be one int for all), flattened,
    kinds a layer lacks (0 bytes) dropped, each tagged with its chunk (``chunk``: ``[n]``)."""
    keep = nbytes.ravel() > 0
    rows = int(keep.sum())

    def column(values: np.ndarray | int) -> np.ndarray:
        if isinstance(values, int):
            return np.full(rows, values, dtype=np.int64)
        return values.ravel()[keep]

    return (
        column(src_tensor),
        column(src_offset),
        column(dst_tensor),
        column(dst_offset),
        column(nbytes),
        np.repeat(chunk, nbytes.shape[1])[keep],
    )


def _by_chunk(parts: list[tuple[np.ndarray, ...]], chunks: int) -> RowSet:
    """Rows tagged with their chunk, ordered by chunk."""
    columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
    order = np.argsort(columns[-1], kind="stable")
    src_tensor, src_offset, dst_tensor, dst_offset, nbytes, chunk = (c[order] for c in columns)
    bounds = np.searchsorted(chunk, np.arange(chunks + 1))
    return RowSet(src_tensor, src_offset, dst_tensor, dst_offset, nbytes, bounds)


def _transfers(
    chunk: np.ndarray,
    section: np.ndarray,
    peer: np.ndarray,
    offset: np.ndarray,
    segment: np.ndarray,
    base: np.ndarray,
) -> list[tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]]:
    """Per chunk, the (sends, recvs) of its (section, peer) regions; arguments are per group
    (``offset`` and ``segment`` per group and kind), groups in region order."""
    out: list[dict[int, list[tuple[int, int, int]]]] = [
        {_SEND: [], _RECEIVE: []} for _ in range(len(base))
    ]
    starts = _run_starts(chunk, section, peer)
    first = np.flatnonzero(starts)
    nbytes = np.bincount(np.cumsum(starts) - 1, weights=segment.sum(axis=1)).astype(np.int64)
    at = base[chunk[first]] + offset[first, 0]
    for c, s, p, a, n in zip(
        chunk[first].tolist(),
        section[first].tolist(),
        peer[first].tolist(),
        at.tolist(),
        nbytes.tolist(),
        strict=True,
    ):
        if s != _STAGE:
            out[c][s].append((p, a, n))
    return [(tuple(c[_SEND]), tuple(c[_RECEIVE])) for c in out]


def _reloads(
    plan: TransferPlan, chunk_starts: Sequence[int], new_rank: int | None
) -> list[tuple[Reload, ...]]:
    """Per chunk, the reloads this rank runs (no Python pass over the steps without any)."""
    if not plan.reloads or new_rank is None:
        return [() for _ in range(len(chunk_starts) - 1)]
    return [
        tuple(
            op
            for step in plan.steps[a:b]
            for op in step.ops
            if isinstance(op, Reload) and op.rank == new_rank
        )
        for a, b in itertools.pairwise(chunk_starts)
    ]
