"""The executor's row copies on one GPU: the fused Triton kernel next to torch's multi-tensor copy.

Rows shaped like a chunk of DeepSeek-V2-Lite experts (bf16 ``w13`` [2816, 2048] and ``w2``
[2048, 1408] rows, 17.3 MB per expert), gathered from slot tensors into one staging buffer (what
the executor's pack does), median of ``--repeats``. Reports GB/s of rows moved (each byte read
once and written once) for ``RowTable.copy`` and ``torch._foreach_copy_`` in the same run.

    python benchmarks/bench_row_copy.py [--experts 24] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from elastic_ep.eplb import row_copy
from elastic_ep.eplb.row_copy import RowTable


def _time(fn: object, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats + 1):
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=24, help="experts per launch")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not row_copy.triton_available():
        print("bench_row_copy needs CUDA and triton")
        return 1
    device = torch.device("cuda", 0)
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
    table = RowTable(staging)
    rows = table.add_pairs(list(zip(sources, targets, strict=True)))
    table.upload()
    row_copy.warm_up(device)
    moved = at
    triton_s = _time(lambda: table.copy(rows), args.repeats)
    torch_s = _time(lambda: torch._foreach_copy_(targets, sources), args.repeats)
    assert all(torch.equal(s, t) for s, t in zip(sources, targets, strict=True))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    aimed = getattr(row_copy, "PROGRAMS", "one per block")
    print(
        f"{torch.cuda.get_device_name(device)} ({sms} SMs): {len(sources)} rows, "
        f"{moved / 1e6:.0f} MB per launch; programs per launch aimed at {aimed}"
    )
    print(f"triton RowTable.copy   {1e3 * triton_s:7.3f} ms  {moved / triton_s / 1e9:7.1f} GB/s")
    print(f"torch _foreach_copy_   {1e3 * torch_s:7.3f} ms  {moved / torch_s / 1e9:7.1f} GB/s")
    print(f"ratio triton / torch time: {triton_s / torch_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
