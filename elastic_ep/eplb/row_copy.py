"""Copy many byte rows between tensors with one kernel launch (Triton), or with torch.

A :class:`RowTable` lists rows as (source address, destination address, byte length). ``execute``
builds one per batch of chunks on the host, holding the batch's launches, uploads it with one
asynchronous copy, and launches one kernel per slice: per chunk, one packs the chunk's rows into
the staging buffer, one copies slot to slot, one writes received rows back.
Addresses are stored as offsets, in words, from an anchor tensor (the staging buffer) so the
kernel only does pointer arithmetic; a slice whose rows are all 4-byte aligned moves int32 words
(16-byte aligned ones also get a vectorization hint), others move bytes.

Rows of one launch must not overlap each other's destinations, and no row may read what another
row of the same launch writes: the order between rows is undefined.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works; only ``copy="triton"`` needs it
    triton = None

BLOCK = 8192
"""Words each Triton program copies per iteration (32 KiB in flight per program). On 2x H200,
where the copies beside the transfers are the run's critical path, the executor's reshuffle
took 28.8 ms with 4096, 24.7 ms with 8192 and 28.1 ms with 16384 (one machine session)."""

SM_SHARE = 0.5
"""Share of the GPU's SMs a launch runs on (one program each): the rest stay free for NCCL.
On one H200 (benchmarks/bench_row_copy.py --beside-nccl, an NCCL send/recv held to 2-16
channels, 97-673 GB/s, as a transfer over NVLink): the former grid of ~240 programs of 4 warps
slowed NCCL to 69-78%; 96 programs (0.73) of 16 warps left it at 98-104% while copying
1.15-1.37 TB/s beside it (1.30 TB/s alone). On 4x H200, where a rank's transfers go to three
peers over more channels, the executor's reshuffle took 23.8-24.0 ms at 0.73 and 21.8-22.4 ms
at 0.5 (0.42: 22.0-22.3, 0.6: 22.5-22.7), the drift and the scale events the same; on 2x
H200 scale-up 1->2 took 50.9-51.2 ms against 53.5-54.1 (benchmarks/bench_executor.py
--triton-grid, one machine session each)."""

NUM_WARPS = 16
"""Warps per program: enough loads in flight for a program to stream ~13 GB/s on its own."""


def triton_available() -> bool:
    return triton is not None


if triton is not None:
    # A launch's table slice starts anywhere in the table, and ``rows`` is often 1: Triton would
    # compile a variant per pointer alignment and per value-1 argument, and a process's first
    # launch of each loads it from the cache or compiles it (0.4 s on H200). Not specializing on
    # them leaves three variants, all compiled by ``warm_up``.
    @triton.jit(
        do_not_specialize=["rows"],
        do_not_specialize_on_alignment=["src_ptr", "dst_ptr", "len_ptr", "first_ptr"],
    )
    def _copy_rows_kernel(  # unannotated: Triton rejects non-constexpr globals such as Any
        anchor,
        src_ptr,
        dst_ptr,
        len_ptr,
        first_ptr,
        rows,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        # The launch's blocks are numbered across its rows (``first_ptr``: a row's first
        # block); block b is copied by program b % programs, so every program gets an equal
        # share whatever the rows' lengths, and the grid stays as small as the launch chose.
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        for row in range(0, rows):
            n = tl.multiple_of(tl.load(len_ptr + row), ALIGN)
            src = tl.multiple_of(tl.load(src_ptr + row), ALIGN)
            dst = tl.multiple_of(tl.load(dst_ptr + row), ALIGN)
            first = tl.load(first_ptr + row) % programs
            # n is int64, so the loop counter is too (rows past 2**31 words stay addressable)
            for block in range(
                (program - first + programs) % programs, (n + BLOCK - 1) // BLOCK, programs
            ):
                offs = block * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                tl.store(anchor + dst + offs, tl.load(anchor + src + offs, mask=mask), mask=mask)


def warm_up(device: torch.device | str, path: str = "triton") -> None:
    """Load (and for Triton compile, or load from Triton's cache) the kernels of ``execute``'s
    copy ``path`` on ``device`` and launch each once, so a process's first ``execute`` does not
    pay it (a fresh process's first Triton launch took 1.6 s on H200). ``"triton"``: the row-copy
    kernel's three variants (16-byte aligned words, 4-byte aligned words, bytes); ``"torch"``:
    the multi-tensor copy of :func:`torch_copy_rows`. Runs on a stream of its own and returns
    once the launches are done, having checked their copies; no-op off CUDA, and for
    ``"triton"`` without Triton."""
    dev = torch.device(device)
    if path not in ("triton", "torch"):
        raise ValueError(f"path must be 'triton' or 'torch', got {path!r}")
    if dev.type != "cuda" or (path == "triton" and triton is None):
        return
    with torch.cuda.device(dev), torch.cuda.stream(torch.cuda.Stream(dev)):
        anchor = torch.zeros(128, dtype=torch.uint8, device=dev)
        anchor[:64] = torch.arange(1, 65, dtype=torch.uint8, device=dev)
        base = anchor.data_ptr()
        rows = [(0, 64, 32), (36, 100, 8), (45, 109, 3)]  # (source, destination, bytes)
        if path == "torch":
            src, dst, nbytes = np.array(rows, dtype=np.int64).T
            tensor = np.zeros(len(rows), dtype=np.int64)  # all rows within the anchor
            torch_copy_rows([anchor], tensor, src, tensor, dst, nbytes)
        else:
            table = RowTable(anchor)
            variants = [table.add([(base + src, base + dst, n)]) for src, dst, n in rows]
            if [(v.word, v.align) for v in variants] != [(4, 4), (4, 1), (1, 1)]:
                raise RuntimeError(f"warm-up rows do not cover the kernel's variants: {variants}")
            table.upload()
            for launch in variants:
                table.copy(launch)
        expected = torch.zeros_like(anchor[64:])  # bytes no row writes stay 0
        for src, _, n in rows:
            expected[src : src + n] = anchor[src : src + n]
        if not torch.equal(anchor[64:], expected):  # syncs the stream
            raise RuntimeError(f"the {path} row copy copied wrong bytes on {dev}")


_warm: set[tuple[torch.device, str]] = set()
_warm_lock = threading.Lock()


def ensure_warm(device: torch.device | str, path: str = "triton") -> None:
    """:func:`warm_up` of ``path`` once per device and process (a caller that finds it running
    waits for it). ``execute`` calls it before it posts anything: CUDA loads a kernel at its
    first launch, and loading waits for the device to go idle, so a first launch mid-run waits
    for transfers that a dead peer never completes, with no bound on the host."""
    dev = torch.device(device)
    with _warm_lock:
        if (dev, path) not in _warm:
            warm_up(dev, path)
            _warm.add((dev, path))


def torch_copy_rows(
    flat: Sequence[torch.Tensor | None],
    src_tensor: np.ndarray,
    src_offset: np.ndarray,
    dst_tensor: np.ndarray,
    dst_offset: np.ndarray,
    nbytes: np.ndarray,
) -> None:
    """Copy byte rows with one multi-tensor copy (``torch._foreach_copy_``): row ``i`` copies
    ``nbytes[i]`` bytes from ``flat[src_tensor[i]]`` at ``src_offset[i]`` to
    ``flat[dst_tensor[i]]`` at ``dst_offset[i]``. ``flat``: uint8 ``[bytes]`` views, by tensor
    number; the arrays are int64 ``[rows]``."""
    if not len(nbytes):
        return
    columns = zip(
        src_tensor.tolist(),
        src_offset.tolist(),
        dst_tensor.tolist(),
        dst_offset.tolist(),
        nbytes.tolist(),
        strict=True,
    )
    sources, targets = [], []
    for src, src_at, dst, dst_at, n in columns:
        sources.append(flat[src][src_at : src_at + n])
        targets.append(flat[dst][dst_at : dst_at + n])
    torch._foreach_copy_(targets, sources)


@dataclass(frozen=True)
class Rows:
    """A slice ``[start, start + count)`` of a :class:`RowTable`, launched at once.

    Attributes:
        word: 4 if every address and length of the slice is a multiple of 4 bytes, else 1.
        align: 4 if every offset and length is a multiple of 16 bytes, else 1 (a hint, in words).
        blocks: blocks of ``BLOCK`` words in all the slice's rows (caps the grid, no device sync).
    """

    start: int
    count: int
    word: int
    align: int
    blocks: int


Row = tuple[int, int, int]
"""(source address, destination address, byte length)."""


class RowTable:
    """Rows of every launch of one batch of ``execute``'s chunks, relative to ``anchor``.

    ``table`` is int64 ``[4, rows]`` on the anchor's device: source offset, destination offset
    and length, each in the words of its slice (see :class:`Rows`), and the number of the row's
    first block in its slice (the blocks of the slice's earlier rows).
    """

    def __init__(self, anchor: torch.Tensor) -> None:
        if anchor.dtype != torch.uint8 or anchor.dim() != 1 or anchor.numel() % 4:
            raise ValueError(
                "anchor must be a 1-D uint8 tensor whose size is a multiple of 4 bytes, got "
                f"{anchor.dtype} {tuple(anchor.shape)}"
            )
        self.anchor = anchor
        self._launches: list[np.ndarray] = []  # int64 [rows, 4] per launch
        self._count = 0
        self.table: torch.Tensor | None = None

    def add(self, rows: Sequence[Row]) -> Rows:
        """Append one launch of ``rows`` (absolute addresses on the anchor's device)."""
        return self.add_arrays(*np.array(rows, dtype=np.int64).reshape(-1, 3).T)

    def add_arrays(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> Rows:
        """Append one launch of rows given as int64 ``[rows]`` arrays: source address,
        destination address (absolute, on the anchor's device) and byte length."""
        (rows,) = self.add_launches(src, dst, nbytes, np.array([len(nbytes)]))
        return rows

    def add_launches(
        self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, counts: np.ndarray
    ) -> list[Rows]:
        """Append many launches at once, in a fixed number of array operations: the rows as in
        :meth:`add_arrays`, launch after launch, ``counts[i]`` rows in launch ``i``."""
        counts = np.asarray(counts, dtype=np.int64)
        ends = np.cumsum(counts)
        starts = ends - counts
        rel = np.stack([src, dst, nbytes], axis=1).astype(np.int64).reshape(-1, 3)
        rel[:, :2] -= self.anchor.data_ptr()

        def any_per_launch(flags: np.ndarray) -> np.ndarray:
            total = np.concatenate([[0], np.cumsum(flags)])
            return total[ends] > total[starts]

        bytes_only = any_per_launch(np.any(rel % 4, axis=1))
        unaligned = any_per_launch(np.any(rel % 16, axis=1))
        word = np.where(bytes_only, 1, 4)
        align = np.where(bytes_only | unaligned, 1, 4)
        words = rel // np.repeat(word, counts)[:, None]
        blocks = -(-words[:, 2] // BLOCK)
        passed = np.concatenate([[0], np.cumsum(blocks)])
        # a row's first block, numbered from its launch's first row
        first = passed[:-1] - np.repeat(passed[starts], counts)
        self._launches.append(np.column_stack([words, first]))
        launch_blocks = passed[ends] - passed[starts]
        base, self._count = self._count, self._count + len(rel)
        return [
            Rows(base + int(a), int(n), int(w), int(al), int(b))
            for a, n, w, al, b in zip(starts, counts, word, align, launch_blocks, strict=True)
        ]

    def add_pairs(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Rows:
        """Append one launch copying each (source, destination) pair of contiguous tensors of
        equal byte size (any dtypes)."""
        rows = []
        for src, dst in pairs:
            nbytes = src.numel() * src.element_size()
            if nbytes != dst.numel() * dst.element_size():
                raise ValueError(f"row sizes differ: {tuple(src.shape)} vs {tuple(dst.shape)}")
            if not (src.is_contiguous() and dst.is_contiguous()):
                raise ValueError("rows must be contiguous")
            rows.append((src.data_ptr(), dst.data_ptr(), nbytes))
        return self.add(rows)

    def upload(self) -> None:
        """Move the table to the anchor's device (one copy) once every launch is added."""
        host = torch.from_numpy(
            np.concatenate(self._launches or [np.zeros((0, 4), dtype=np.int64)]).T.copy()
        )
        if self.anchor.device.type == "cuda":
            # Pinned: the copy queues behind the stream's work instead of waiting for it.
            host = host.pin_memory()
        self.table = host.to(self.anchor.device, non_blocking=True)

    def copy(
        self,
        rows: Rows,
        kernel: Any = None,
        programs: int | None = None,
        num_warps: int | None = None,
    ) -> None:
        """Copy every row of ``rows``, in no particular order, with one launch of ``kernel``
        (default: the compiled Triton kernel; tests pass an interpreted one) on ``programs``
        programs of ``num_warps`` warps (default: ``SM_SHARE`` of the device's SMs, one per block
        off CUDA, and ``NUM_WARPS``), fewer programs if the rows have fewer blocks."""
        self.launcher(rows, kernel, programs, num_warps)()

    def launcher(
        self,
        rows: Rows,
        kernel: Any = None,
        programs: int | None = None,
        num_warps: int | None = None,
    ) -> Callable[[], None]:
        """:meth:`copy` of ``rows`` with its arguments built now: the call only launches (on
        an H200 host, ~28 us of host time against ~58 us for :meth:`copy`)."""
        if not rows.blocks:
            return _nothing
        if self.table is None:
            raise RuntimeError("RowTable.upload() must run before copy()")
        if programs is None:
            programs = programs_for(self.anchor.device) or rows.blocks
        part = self.table[:, rows.start : rows.start + rows.count].unbind()
        anchor = self.anchor if rows.word == 1 else self.anchor.view(torch.int32)
        launch = (_copy_rows_kernel if kernel is None else kernel)[
            (max(1, min(programs, rows.blocks)),)
        ]
        return functools.partial(
            launch,
            anchor,
            *part,
            rows.count,
            BLOCK=BLOCK,
            ALIGN=rows.align,
            num_warps=NUM_WARPS if num_warps is None else num_warps,
        )


def _nothing() -> None:
    """The launch of rows with no bytes."""


def programs_for(device: torch.device) -> int | None:
    """Programs per launch on ``device`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    return max(1, round(SM_SHARE * _multiprocessors(device)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
