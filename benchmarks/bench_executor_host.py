"""Host time of ``execute``'s own work on one device: layout, launches, write-back; no peer.

What the executor's host does for rank 0 of a DeepSeek-V2-Lite-sized 2-rank plan (26 layers,
64 experts, 40 slots per rank, bf16 ``w13``/``w2``; a full reshuffle and a 10% drift), with its
copies run for real on the device and the transfers left out (one device has no peer): the
layout of the chunks (``Runner.launch``, in growing batches), and each chunk's pack and
write-back launches.
Every copy path the device can run, side by side; median of ``--repeats``. On 2 GPUs this host
work runs beside the transfers, so it bounds how fast the executor can go.

    python benchmarks/bench_executor_host.py [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch
from bench_executor import drift, random_placement

from elastic_ep.eplb import GroupRanks, Phase, plan_transfers
from elastic_ep.eplb.copy_engine import engine_available
from elastic_ep.eplb.exec_chunks import cut_chunks
from elastic_ep.eplb.exec_layout import aligned
from elastic_ep.eplb.exec_ranks import ProcessRanks
from elastic_ep.eplb.exec_runner import Runner, Timer
from elastic_ep.eplb.row_copy import triton_available, warm_up


class _OneDevice:
    """What the runner reads of a group when nothing is posted: rank, size and device."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.rank, self.world_size, self.device = 0, world_size, device

    def prepare_p2p(self, sends: object, recvs: object) -> None:
        """No batch: the runner then posts nothing for the chunk (its checks go uncounted)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny experts, for a CPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        warm_up(device)
    rng = random.Random(0)
    layers, experts, ranks, slots = 26, 64, 2, 40
    hidden, intermediate, budget = 2048, 1408, 2048 << 20
    if args.small:
        layers, hidden, intermediate, budget = 4, 64, 48, 1 << 20
    shapes = [(2 * intermediate, hidden), (hidden, intermediate)]
    base = random_placement(rng, layers, experts, ranks, slots)
    plans = {
        "reshuffle": plan_transfers(base, random_placement(rng, layers, experts, ranks, slots)),
        "drift10": plan_transfers(base, drift(rng, base, 0.1)),
    }
    weights = [
        [torch.empty((slots, *s), dtype=torch.bfloat16, device=device) for s in shapes]
        for _ in range(layers)
    ]
    kind_bytes = [[t[0].numel() * t.element_size() for t in layer] for layer in weights]
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes]
    paths = ["torch"]
    if device.type == "cuda":
        paths += ["triton"] if triton_available() else []
        paths += ["engine"] if engine_available(device) else []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: host ms of rank 0's own work, no transfers, median of {args.repeats}")
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for scenario, plan in plans.items():
        ranks_of = GroupRanks.new_numbering(plan.rank_mapping)
        process = ProcessRanks(ranks_of, 0, ranks, 0, 0)
        chunks = cut_chunks(plan, row_bytes, ranks_of, ranks, budget, True)
        for path in paths:
            runner = Runner(
                plan,
                weights,
                _OneDevice(device, ranks),  # type: ignore[arg-type]
                process,
                chunks,
                kind_bytes,
                None,
                Timer(),
                path,
            )
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                runner.size_buffer(budget)
                runs = [_once(runner, device) for _ in range(args.repeats + 1)][1:]
            host, wall, layout_s = (statistics.median(r[i] for r in runs) for i in range(3))
            print(
                f"{scenario:9s} {path:6s} {len(chunks):3d} chunks: host {1e3 * host:6.2f} ms "
                f"({1e3 * host / len(chunks):.3f} per chunk; layout {1e3 * layout_s:.2f}), "
                f"device done after {1e3 * wall:6.2f} ms"
            )
    return 0


def _once(runner: Runner, device: torch.device) -> tuple[float, float, float]:
    """(host seconds, seconds until the device is done, layout seconds) of one pass."""
    runner.timer = Timer()
    runner.launches = []
    start = time.perf_counter()
    for k in range(len(runner.chunks)):
        chunk = runner.launch(k)
        runner.pack(chunk)
        runner.direct(chunk)
        runner.write_back(None, chunk)
    host = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    layout = runner.timer.seconds[Phase.PLAN]
    return host - start, time.perf_counter() - start, layout


if __name__ == "__main__":
    raise SystemExit(main())
