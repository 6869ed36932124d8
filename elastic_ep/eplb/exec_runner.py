"""One rank's run of a plan's chunks, in one preallocated staging buffer.

Every rank has the same chunks (:mod:`~elastic_ep.eplb.exec_chunks`); :class:`Runner` turns its
own part of each into launches (:class:`Launches`) and runs them in stream order:

* **layout**: chunks are laid out in growing batches just before they run
  (:func:`~elastic_ep.eplb.exec_layout.lay_out_chunks`, numpy over the plan's op table): 2, then
  4, 8, ... chunks, each batch while the chunk before it transfers (a plan of at most
  ``SMALL_PLAN_CHUNKS`` chunks at once); ``prepare_execution`` lays out all of them ahead;
* **launches**: per chunk a pack (rows into the buffer), its transfers (one per peer, checked
  ahead as a :class:`~elastic_ep.groups.stateless_group.P2PBatch`), its slot-to-slot copies and
  its write-back (rows out of the buffer, then reloads). Each copy kind is one launch: a slice of
  one fused Triton row table per batch (``"triton"``), one batch on the copy engines
  (``"engine"``), or one multi-tensor copy (``"torch"``);
* **buffer**: even chunks at its start, odd chunks at its end, so chunk ``k+1`` is packed and
  posted before chunk ``k`` is written back whenever the two fit together; a chunk reuses the
  bytes of the chunk two before it, already written back (stream-ordered on CUDA).

The order per chunk (see :meth:`Runner.run`) keeps every slot read no later than the write that
overwrites it, which the plan's step order makes possible.
"""

from __future__ import annotations

import enum
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elastic_ep.eplb.copy_engine import batch_copy
from elastic_ep.eplb.exec_check import PlanCheck
from elastic_ep.eplb.exec_chunks import Chunk
from elastic_ep.eplb.exec_layout import ChunkLayout, RowSet, kinds_of, lay_out_chunks
from elastic_ep.eplb.exec_ranks import ProcessRanks
from elastic_ep.eplb.row_copy import RowTable, torch_copy_rows
from elastic_ep.eplb.transfer_ops import Reload
from elastic_ep.eplb.transfer_plan import TransferPlan
from elastic_ep.groups.stateless_group import P2PBatch, StatelessGroup, WorkHandle

ALIGN_ANCHOR = 16
"""Bytes of the row tables' anchor when the staging buffer is empty."""

SMALL_PLAN_CHUNKS = 4
"""Plans of at most this many chunks are laid out in one call (see ``Runner.launch``)."""

ReloadHook = Callable[[int, int], Sequence[torch.Tensor]]
"""``reload(layer, expert) -> tensors``: one tensor per weight kind, each shaped like one slot."""


class Phase(enum.Enum):
    """Phases of ``execute`` timed in ``ExecutionStats``."""

    PLAN = "plan"
    STAGE = "stage"
    P2P = "p2p"
    WRITE_BACK = "write_back"


class Timer:
    """Wall seconds spent per :class:`Phase` on this rank."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(Phase, 0.0)

    def add(self, phase: Phase, start: float) -> None:
        self.seconds[phase] += time.perf_counter() - start


def _torch_copy(flat: Sequence[torch.Tensor | None], rows: RowSet) -> None:
    """One multi-tensor copy of ``rows`` between byte views (``flat[tensor number]``)."""
    torch_copy_rows(
        flat, rows.src_tensor, rows.src_offset, rows.dst_tensor, rows.dst_offset, rows.nbytes
    )


@dataclass(frozen=True)
class Launches:
    """One chunk's layout, its transfers (checked, None if it has none) and its three copy
    launches: pack, slot-to-slot copies (first: other writes may overwrite their sources), and
    write-back."""

    layout: ChunkLayout
    transfers: P2PBatch | None
    pack: Callable[[], None]
    direct: Callable[[], None]
    unpack: Callable[[], None]


class Runner:
    """Runs this rank's part of the chunks in one preallocated buffer.

    Even chunks sit at the start of the buffer and odd chunks at its end, so two consecutive
    chunks never share bytes when both fit; a chunk reuses the bytes of the chunk two before it,
    which was written back (stream-ordered on CUDA) before this one is packed. Chunks are laid out
    in growing batches just before they run (see :meth:`launch`).
    """

    def __init__(
        self,
        plan: TransferPlan,
        weights: Sequence[Sequence[torch.Tensor]],
        group: StatelessGroup,
        process: ProcessRanks,
        chunks: list[Chunk],
        kind_bytes: list[list[int]],
        reload: ReloadHook | None,
        timer: Timer,
        copy_path: str,
    ) -> None:
        self.plan, self.weights, self.group, self.process = plan, weights, group, process
        self.chunks, self.kind_bytes, self.reload_hook = chunks, kind_bytes, reload
        self.timer, self.copy_path = timer, copy_path
        self.chunk_starts = [0, *itertools.accumulate(len(c.steps) for c in chunks)]
        self.launches: list[Launches] = []
        self.reloaded: list[tuple[int, int]] = []
        self.first_transfer = 0.0  # perf_counter when the first chunk is posted (see run)
        self.handles: list[WorkHandle] = []  # every posted chunk's, checked after the run

    def size_buffer(self, overlap_budget: int) -> None:
        """Decide which chunks overlap and allocate the buffer, from the estimated sizes (upper
        bounds of the laid-out ones)."""
        sizes = [c.bytes_on(self.process.group_rank) for c in self.chunks]
        # Overlap chunk k+1 with chunk k only if both fit in the budget at once.
        self.overlapped = [a + b <= overlap_budget for a, b in itertools.pairwise(sizes)] + [False]
        pairs = [a + b for a, b, o in zip(sizes, sizes[1:], self.overlapped, strict=False) if o]
        self.buffer_bytes = max([0, *sizes, *pairs])
        self.buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8, device=self.group.device)
        # Every tensor by its number in a layout's rows: byte views for the torch path,
        # addresses for the fused ones (once per call, not per batch).
        kinds = kinds_of(self.kind_bytes)
        tensors: list[torch.Tensor | None] = [self.buffer]
        for layer in self.weights:
            tensors.extend([*layer, *[None] * (kinds - len(layer))])
        if self.copy_path == "torch":
            self.flat = [None if t is None else t.view(-1).view(torch.uint8) for t in tensors]
        else:
            self.address = np.array([0 if t is None else t.data_ptr() for t in tensors])

    def launch(self, k: int) -> Launches:
        """Chunk ``k``'s launches. A layout's cost is mostly fixed (0.2 ms of host time per call
        on the 2-core VM, 1.4 ms on the 2x H200 machine's host), so a plan of up to
        ``SMALL_PLAN_CHUNKS`` chunks is laid out at once; a larger one in batches of 2, 4, 8, ...
        chunks: chunks 0 and 1 first (chunk 0 is short, see ``exec_chunks.RAMP``), so that the
        first transfer starts early, then each batch while the chunk before it transfers."""
        if k == len(self.launches):
            chunks = len(self.chunks)
            self.lay_out(k, chunks if chunks <= SMALL_PLAN_CHUNKS else min(chunks, 2 * k + 2))
        return self.launches[k]

    def lay_out(self, first: int, last: int) -> None:
        """Lay out chunks ``first`` to ``last`` (exclusive; numpy, a few dozen array operations
        however many) and turn their rows into launches; the Triton path lists every launch of
        the batch in one row table, uploaded once."""
        start = time.perf_counter()
        layout = lay_out_chunks(
            self.plan,
            self.chunk_starts,
            self.kind_bytes,
            self.process.ranks,
            self.process.old_rank,
            self.process.new_rank,
            self.buffer_bytes,
            first,
            last,
        )
        row_sets = (layout.pack, layout.direct, layout.unpack)
        if self.copy_path == "torch":
            copies = self._torch_copies(self.flat, row_sets, len(layout.chunks))
        else:
            src = [self.address[r.src_tensor] + r.src_offset for r in row_sets]
            dst = [self.address[r.dst_tensor] + r.dst_offset for r in row_sets]
            copies = self._fused_copies(src, dst, row_sets, len(layout.chunks))
        self.launches.extend(
            Launches(chunk, self._transfers(chunk), *(kind[c] for kind in copies))
            for c, chunk in enumerate(layout.chunks)
        )
        self.timer.add(Phase.PLAN, start)

    def _transfers(self, chunk: ChunkLayout) -> P2PBatch | None:
        """The chunk's transfers between buffer regions, checked now (off the run's path)."""
        if not chunk.sends and not chunk.recvs:
            return None
        return self.group.prepare_p2p(
            [(self.buffer[o : o + n], peer) for peer, o, n in chunk.sends],
            [(self.buffer[o : o + n], peer) for peer, o, n in chunk.recvs],
        )

    @staticmethod
    def _torch_copies(
        flat: list[torch.Tensor | None], row_sets: Sequence[RowSet], chunks: int
    ) -> list[list[Callable[[], None]]]:
        """Per launch kind and chunk, one multi-tensor copy between byte views (partials of the
        free function ``_torch_copy``: a launch that held the runner would keep the buffer alive
        in a reference cycle after the call)."""
        return [
            [functools.partial(_torch_copy, flat, rows.of_chunk(c)) for c in range(chunks)]
            for rows in row_sets
        ]

    def _fused_copies(
        self,
        src: list[np.ndarray],
        dst: list[np.ndarray],
        row_sets: Sequence[RowSet],
        chunks: int,
    ) -> list[list[Callable[[], None]]]:
        """Per launch kind and chunk, one launch: on the Triton path every launch of the batch
        is a slice of one row table (pack launches, then slot-to-slot, then write-back),
        uploaded once; on the copy engines one batch copy each."""
        if self.copy_path == "engine":
            stream = torch.cuda.current_stream(self.group.device)
            return [
                [
                    functools.partial(batch_copy, s[a:b], d[a:b], rows.nbytes[a:b], stream)
                    for a, b in itertools.pairwise(rows.bounds.tolist())
                ]
                for s, d, rows in zip(src, dst, row_sets, strict=True)
            ]
        # Row tables address everything from a live allocation (an empty buffer has none).
        anchor = (
            self.buffer
            if self.buffer_bytes
            else torch.empty(ALIGN_ANCHOR, dtype=torch.uint8, device=self.group.device)
        )
        table = RowTable(anchor)
        launches = table.add_launches(
            np.concatenate(src),
            np.concatenate(dst),
            np.concatenate([r.nbytes for r in row_sets]),
            np.concatenate([np.diff(r.bounds) for r in row_sets]),
        )
        table.upload()
        return [
            [table.launcher(r) for r in launches[i * chunks : (i + 1) * chunks]]
            for i in range(len(row_sets))
        ]

    def run(self, check: PlanCheck) -> None:
        """Run every chunk. Stream order per chunk ``k``: pack, post its transfers, then chunk
        ``k-1``'s slot-to-slot copies and write-back (nothing a post waits for follows a pack),
        then pack chunk ``k+1`` into the buffer half chunk ``k-1`` freed. The last chunk's (and
        a chunk's that no other overlaps) slot-to-slot copies go right after its post, beside its
        transfer: a chunk's write-back may overwrite their sources, an earlier chunk's cannot.
        Each chunk's slot-to-slot copies thus come before its own write-back and every later
        chunk's. The plan check is posted before chunk 0's pack (packing reads the weights and
        writes only the buffer) and awaited before the first transfer."""
        if not check.passed:  # else PreparedExecution.check ran it ahead
            check.start()
        chunks = len(self.chunks)
        if chunks:
            self.pack(self.launch(0))
        if not check.passed:
            check.wait()
        self.first_transfer = time.perf_counter()
        directs = 0  # chunks whose slot-to-slot copies are launched
        posted: tuple[WorkHandle | None, Launches] | None = None
        for k in range(chunks):
            chunk = self.launch(k)
            handle = self.post(chunk)
            alone = k == chunks - 1 or not self.overlapped[k]
            while directs <= (k if alone else k - 1):
                self.direct(self.launch(directs))
                directs += 1
            if posted is not None:
                self.write_back(*posted)
            posted = (handle, chunk)
            if not self.overlapped[k]:  # chunk k+1 needs chunk k's buffer
                self.write_back(*posted)
                posted = None
            if k + 1 < chunks:
                self.pack(self.launch(k + 1))
        if posted is not None:
            self.write_back(*posted)

    def pack(self, chunk: Launches) -> None:
        """Copy what this rank sends, and staged local-copy sources, into the chunk's region
        (one launch: few rows per segment make per-segment gathers slow)."""
        start = time.perf_counter()
        chunk.pack()
        self.timer.add(Phase.STAGE, start)

    def direct(self, chunk: Launches) -> None:
        """The chunk's slot-to-slot copies (before its write-back)."""
        start = time.perf_counter()
        chunk.direct()
        self.timer.add(Phase.WRITE_BACK, start)

    def post(self, chunk: Launches) -> WorkHandle | None:
        start = time.perf_counter()
        handle = None if chunk.transfers is None else chunk.transfers.post()
        if handle is not None:
            self.handles.append(handle)
        self.timer.add(Phase.P2P, start)
        return handle

    def write_back(self, handle: WorkHandle | None, chunk: Launches) -> None:
        """Wait for the chunk's transfers, then write everything this rank receives into place
        (after the chunk's slot-to-slot copies)."""
        start = time.perf_counter()
        if handle is not None:
            handle.wait()
        self.timer.add(Phase.P2P, start)
        start = time.perf_counter()
        chunk.unpack()
        for op in chunk.layout.reloads:
            weights = self.weights[op.layer]
            for w, src in zip(weights, self._reload(op, weights), strict=True):
                for slot in op.dst_slots:
                    w[slot].copy_(src, non_blocking=True)
        self.timer.add(Phase.WRITE_BACK, start)

    def _reload(self, op: Reload, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert self.reload_hook is not None  # execute raised LostExpertsError otherwise
        tensors = list(self.reload_hook(op.layer, op.expert))
        if len(tensors) != len(weights) or any(
            not isinstance(t, torch.Tensor) or t.shape != w.shape[1:] or t.dtype != w.dtype
            for t, w in zip(tensors, weights, strict=False)
        ):
            raise ValueError(
                f"reload({op.layer}, {op.expert}) must return {len(weights)} tensors shaped "
                f"{[(tuple(w.shape[1:]), w.dtype) for w in weights]}, got "
                f"{[(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tensors]}"
            )
        self.reloaded.append((op.layer, op.expert))
        if weights[0].device.type != "cuda":
            return tensors
        # From pinned memory the upload is queued on the stream; from pageable memory torch
        # would wait for the stream first, i.e. for the transfers before it, with no bound when
        # a peer has died (a test's survivor hung there). The host-to-host copy is the price.
        return [t.pin_memory() if t.device.type == "cpu" else t for t in tensors]
