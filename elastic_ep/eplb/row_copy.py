"""Copy many byte rows between tensors with one kernel launch (Triton), or with torch.

A :class:`RowTable` lists rows as (source address, destination address, byte length). ``execute``
builds one per chunk on the host (while the previous chunk's transfer runs), uploads it with one
asynchronous copy, and launches one kernel per slice: one packs the chunk's rows into the staging
buffer, one copies slot to slot, one writes received rows back.
Addresses are stored as offsets, in words, from an anchor tensor (the staging buffer) so the
kernel only does pointer arithmetic; a slice whose rows are all 4-byte aligned moves int32 words
(16-byte aligned ones also get a vectorization hint), others move bytes.

Rows of one launch must not overlap each other's destinations, and no row may read what another
row of the same launch writes: the order between rows is undefined.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works; only ``copy="triton"`` needs it
    triton = None

BLOCK = 4096
"""Words each Triton program copies per iteration."""

PROGRAMS = 264
"""Programs a launch aims at (rows x programs per row), two per SM of an H100/H200; each loops
over its row with a stride. A grid of one program per block filled every SM, and a timeline of
the executor on 2x H200 showed the NCCL transfer beside such copies running at ~75% of its
speed. Alone on one H200 (benchmarks/bench_row_copy.py, 415 MB of expert rows) 264 programs
copy at 1.60 TB/s, as fast as one program per block (1.64), 132 at 1.06."""


def triton_available() -> bool:
    return triton is not None


if triton is not None:
    # A launch's table slice starts anywhere in the table, and per_row and iters are often 1:
    # Triton would compile a variant per pointer alignment and per value-1 argument, and a
    # process's first launch of each loads it from the cache or compiles it (0.4 s on H200).
    # Not specializing on them leaves three variants, all compiled by ``warm_up``.
    @triton.jit(
        do_not_specialize=["per_row", "iters"],
        do_not_specialize_on_alignment=["src_ptr", "dst_ptr", "len_ptr"],
    )
    def _copy_rows_kernel(  # unannotated: Triton rejects non-constexpr globals such as Any
        anchor,
        src_ptr,
        dst_ptr,
        len_ptr,
        per_row,
        iters,
        BLOCK: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        row = tl.program_id(0)
        n = tl.multiple_of(tl.load(len_ptr + row), ALIGN)
        src = tl.multiple_of(tl.load(src_ptr + row), ALIGN)
        dst = tl.multiple_of(tl.load(dst_ptr + row), ALIGN)
        # program j of a row copies its blocks j, j + per_row, j + 2 * per_row, ... (``iters``
        # covers the longest row of the launch; a shorter row's programs mask the rest)
        for i in range(0, iters):
            block = tl.program_id(1) + i * per_row
            offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(anchor + dst + offs, tl.load(anchor + src + offs, mask=mask), mask=mask)


def warm_up(device: torch.device | str) -> None:
    """Compile the kernel (or load it from Triton's cache) for each of its variants (16-byte
    aligned words, 4-byte aligned words, bytes) and launch each once on ``device``, so a
    process's first ``execute`` does not pay it (a fresh process's first launch took 1.6 s on
    H200). Runs on a stream of its own and returns once the launches are done, having checked
    their copies; no-op without CUDA or Triton."""
    dev = torch.device(device)
    if triton is None or dev.type != "cuda":
        return
    with torch.cuda.device(dev), torch.cuda.stream(torch.cuda.Stream(dev)):
        anchor = torch.zeros(128, dtype=torch.uint8, device=dev)
        anchor[:64] = torch.arange(1, 65, dtype=torch.uint8, device=dev)
        base = anchor.data_ptr()
        table = RowTable(anchor)
        variants = [
            table.add([(base, base + 64, 32)]),  # words, 16-byte aligned
            table.add([(base + 36, base + 100, 8)]),  # words, 4-byte aligned
            table.add([(base + 45, base + 109, 3)]),  # bytes
        ]
        if [(v.word, v.align) for v in variants] != [(4, 4), (4, 1), (1, 1)]:
            raise RuntimeError(f"warm-up rows do not cover the kernel's variants: {variants}")
        table.upload()
        for rows in variants:
            table.copy(rows)
        expected = torch.zeros_like(anchor[64:])  # bytes no row writes stay 0
        for start, end in ((0, 32), (36, 44), (45, 48)):
            expected[start:end] = anchor[start:end]
        if not torch.equal(anchor[64:], expected):  # syncs the stream
            raise RuntimeError(f"the row-copy kernel copied wrong bytes on {dev}")


@dataclass(frozen=True)
class Rows:
    """A slice ``[start, start + count)`` of a :class:`RowTable`, launched at once.

    Attributes:
        word: 4 if every address and length of the slice is a multiple of 4 bytes, else 1.
        align: 4 if every offset and length is a multiple of 16 bytes, else 1 (a hint, in words).
        max_words: the longest row, in words (sizes the grid with no device sync).
    """

    start: int
    count: int
    word: int
    align: int
    max_words: int


Row = tuple[int, int, int]
"""(source address, destination address, byte length)."""


class RowTable:
    """Rows of every launch of one ``execute`` call, relative to ``anchor``.

    ``table`` is int64 ``[3, rows]`` on the anchor's device: source offset, destination offset
    and length, each in the words of its slice (see :class:`Rows`).
    """

    def __init__(self, anchor: torch.Tensor) -> None:
        if anchor.dtype != torch.uint8 or anchor.dim() != 1 or anchor.numel() % 4:
            raise ValueError(
                "anchor must be a 1-D uint8 tensor whose size is a multiple of 4 bytes, got "
                f"{anchor.dtype} {tuple(anchor.shape)}"
            )
        self.anchor = anchor
        self._launches: list[np.ndarray] = []  # int64 [rows, 3] per launch, in words
        self._count = 0
        self.table: torch.Tensor | None = None

    def add(self, rows: Sequence[Row]) -> Rows:
        """Append one launch of ``rows`` (absolute addresses on the anchor's device)."""
        rel = np.array(rows, dtype=np.int64).reshape(-1, 3)
        rel[:, :2] -= self.anchor.data_ptr()
        word = 4 if not (rel % 4).any() else 1
        align = 4 if word == 4 and not (rel % 16).any() else 1
        start, self._count = self._count, self._count + len(rel)
        self._launches.append(rel // word)
        max_words = int(rel[:, 2].max()) // word if len(rel) else 0
        return Rows(start, len(rel), word, align, max_words)

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
            np.concatenate(self._launches or [np.zeros((0, 3), dtype=np.int64)]).T.copy()
        )
        if self.anchor.device.type == "cuda":
            # Pinned: the copy queues behind the stream's work instead of waiting for it.
            host = host.pin_memory()
        self.table = host.to(self.anchor.device, non_blocking=True)

    def copy(self, rows: Rows, kernel: Any = None) -> None:
        """Copy every row of ``rows``, in no particular order, with one launch of ``kernel``
        (default: the compiled Triton kernel; tests pass an interpreted one)."""
        if not rows.count:
            return
        if self.table is None:
            raise RuntimeError("RowTable.upload() must run before copy()")
        part = self.table[:, rows.start : rows.start + rows.count]
        anchor = self.anchor if rows.word == 1 else self.anchor.view(torch.int32)
        blocks = max(1, -(-rows.max_words // BLOCK))
        per_row = max(1, min(blocks, PROGRAMS // rows.count))
        iters = -(-blocks // per_row)
        kernel = _copy_rows_kernel if kernel is None else kernel
        kernel[(rows.count, per_row)](
            anchor, part[0], part[1], part[2], per_row, iters, BLOCK=BLOCK, ALIGN=rows.align
        )
