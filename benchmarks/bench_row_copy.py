"""The executor's row copies on one GPU: the fused Triton kernel, the copy engines' batch copy and
torch's multi-tensor copy, side by side; alone, and beside an NCCL transfer.

Rows shaped like a chunk of DeepSeek-V2-Lite experts (bf16 ``w13`` [2816, 2048] and ``w2``
[2048, 1408] rows, 17.3 MB per expert), gathered from slot tensors into one staging buffer (what
the executor's pack does), median of ``--repeats``. Reports GB/s of rows moved (each byte read
once and written once) for ``RowTable.copy``, ``copy_engine.batch_copy`` and
``torch._foreach_copy_`` in the same run.

``--grids 96x16,240x4``: the Triton kernel on each (programs x warps per program), besides the
default (``row_copy.SM_SHARE`` of the SMs, ``NUM_WARPS``).

``--beside-nccl``: the executor runs its copies while NCCL moves the neighbouring chunk, and both
want the SMs. One GPU has no peer, so the NCCL load is a send/recv to itself on a one-rank
process group (NCCL's send/recv kernel), held to ``--nccl-channels`` channels so that it moves
about what one NVLink transfer does (8 channels: ~380 GB/s on H200) instead of saturating HBM.
Each copy path runs over and over on one stream while that load runs on another, and both speeds
are printed next to their speeds alone.

    python benchmarks/bench_row_copy.py [--experts 24] [--repeats 20] [--beside-nccl]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from elastic_ep.eplb import row_copy
from elastic_ep.eplb.copy_engine import batch_copy, engine_available
from elastic_ep.eplb.row_copy import RowTable


def _elapsed(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return statistics.median(_elapsed(fn) for _ in range(repeats))


def _nccl_load(device: torch.device, nbytes: int, channels: int) -> Callable[[int], None]:
    """``load(n)``: n NCCL send/recv pairs of ``nbytes`` to this rank itself."""
    os.environ["NCCL_MIN_NCHANNELS"] = os.environ["NCCL_MAX_NCHANNELS"] = str(channels)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def load(times: int) -> None:
        for _ in range(times):
            ops = [dist.P2POp(dist.isend, src, 0), dist.P2POp(dist.irecv, dst, 0)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    return load


def _beside(
    copy: Callable[[], object], load: Callable[[int], None], load_alone: float, copy_alone: float
) -> tuple[float, float]:
    """(copy seconds, load seconds per call) with the two running at once on two streams."""
    times = 8
    copies = max(1, round(times * load_alone / copy_alone))
    load_stream, copy_stream = torch.cuda.Stream(), torch.cuda.Stream()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    with torch.cuda.stream(load_stream):
        events[0].record()
        load(times)
        events[1].record()
    with torch.cuda.stream(copy_stream):
        copy_stream.wait_event(events[0])
        events[2].record()
        for _ in range(copies):
            copy()
        events[3].record()
    torch.cuda.synchronize()
    return (
        events[2].elapsed_time(events[3]) / 1e3 / copies,
        events[0].elapsed_time(events[1]) / 1e3 / times,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=24, help="experts per launch")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--beside-nccl", action="store_true", help="also time beside NCCL")
    parser.add_argument("--nccl-mb", type=int, default=1024, help="bytes of one NCCL send/recv")
    parser.add_argument("--nccl-channels", type=int, default=8)
    parser.add_argument("--grids", default="", help="more Triton grids: PROGRAMSxWARPS,...")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not row_copy.triton_available():
        print("bench_row_copy needs CUDA and triton")
        return 1
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    shapes = ((2816, 2048), (2048, 1408))
    weights = [torch.randn(args.slots, *s, device=device).to(torch.bfloat16) for s in shapes]
    row_bytes = [w[0].numel() * w.element_size() for w in weights]
    staging = torch.empty(args.experts * sum(row_bytes), dtype=torch.uint8, device=device)
    slots = torch.randperm(args.slots)[: args.experts].tolist()
    targets, sources = [], []
    at = 0
    for w, nbytes in zip(weights, row_bytes, strict=True):
        for s in slots:
            targets.append(staging[at : at + nbytes].view(w.dtype).view(w.shape[1:]))
            sources.append(w[s])
            at += nbytes
    pairs = list(zip(sources, targets, strict=True))
    table = RowTable(staging)
    rows = table.add_pairs(pairs)
    table.upload()
    row_copy.warm_up(device)
    default = f"{row_copy.programs_for(device)}x{row_copy.NUM_WARPS}"
    paths: dict[str, Callable[[], object]] = {}
    for grid in dict.fromkeys([default, *filter(None, args.grids.split(","))]):
        programs, warps = (int(x) for x in grid.split("x"))
        paths[f"triton {grid}"] = functools.partial(table.copy, rows, None, programs, warps)
    paths["torch _foreach_copy_"] = lambda: torch._foreach_copy_(targets, sources)
    if engine_available(device):
        columns = [np.array([t.data_ptr() for t in ts]) for ts in (sources, targets)]
        lengths = np.array([t.numel() * t.element_size() for t in sources])

        def engine() -> None:
            batch_copy(columns[0], columns[1], lengths, torch.cuda.current_stream())

        paths["engine batch_copy"] = engine
    moved = at
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(
        f"{torch.cuda.get_device_name(device)} ({sms} SMs): {len(sources)} rows, "
        f"{moved / 1e6:.0f} MB per launch; Triton grids: programs x warps per program, the "
        f"default {default} first"
    )
    alone = {}
    with torch.cuda.stream(torch.cuda.Stream()):  # the copy engines refuse the default stream
        for name, fn in paths.items():
            staging.zero_()
            alone[name] = _time(fn, args.repeats)
            if not all(torch.equal(s, t) for s, t in pairs):
                raise RuntimeError(f"{name} copied wrong bytes")
            print(f"{name:22s} {1e3 * alone[name]:7.3f} ms  {moved / alone[name] / 1e9:7.1f} GB/s")
    if args.beside_nccl:
        load = _nccl_load(device, args.nccl_mb << 20, args.nccl_channels)
        load_alone = _time(lambda: load(1), args.repeats)
        load_gbps = (args.nccl_mb << 20) / load_alone / 1e9
        print(
            f"NCCL send/recv to itself ({args.nccl_channels} channels) alone: {load_gbps:.0f} GB/s"
        )
        for name, fn in paths.items():
            copy_s, load_s = _beside(fn, load, load_alone, alone[name])
            print(
                f"beside NCCL: {name:22s} {moved / copy_s / 1e9:7.1f} GB/s "
                f"({100 * alone[name] / copy_s:3.0f}% of alone); NCCL "
                f"{(args.nccl_mb << 20) / load_s / 1e9:6.0f} GB/s ({100 * load_alone / load_s:3.0f}% of alone)"
            )
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
