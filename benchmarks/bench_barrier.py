"""How far apart the ranks leave a barrier: torch's timed ``Work.wait`` against
``StatelessGroup.barrier``, side by side in the same processes.

Raw = an all-reduce of one int on the group's own ProcessGroup, then ``work.wait(timeout)``
(what the library did before, and what a hand-written group does to bound a wait); library =
``StatelessGroup.barrier()`` (same all-reduce, completion polled by ``groups.polling``). Each
variant runs ``--barriers`` barriers twice, interleaved (raw, library, raw, library), with some
uneven host work between barriers as an engine has. Every rank stamps ``time.perf_counter()``
(CLOCK_MONOTONIC, one clock for all processes of a host) as it leaves each barrier.

Reported per variant: the spread (latest minus earliest rank) of the departures, median / p90 /
max over the barriers, the time per barrier in the loop, and the ratios raw / library.

    python benchmarks/bench_barrier.py --backend nccl --devices 4
    python benchmarks/bench_barrier.py --devices 2          # gloo on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta

import torch
from ranks import run_ranks

from elastic_ep.groups import Rendezvous, StatelessGroup

VARIANTS = ("raw", "library")


def _stamps(group: StatelessGroup, how: str, barriers: int, token: torch.Tensor) -> list[float]:
    out = []
    for i in range(barriers):
        if how == "raw":
            group.process_group.allreduce([token]).wait(timedelta(seconds=group.timeout_s))
        else:
            group.barrier()
        out.append(time.perf_counter())
        if i % 3 == 0:  # uneven host work between barriers
            time.sleep(0.0002 * ((group.rank + i) % 4))
    return out


def _worker(rank: int, port: int, args: argparse.Namespace) -> list[dict[str, list[list[float]]]]:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    group = StatelessGroup(rdzv, "barrier", 0, rank, args.devices, args.backend, device, 60)
    token = torch.ones(1, dtype=torch.int32, device=device)
    runs: dict[str, list[list[float]]] = {how: [] for how in VARIANTS}
    for _ in range(2):
        for how in VARIANTS:
            runs[how].append(_stamps(group, how, args.barriers, token))
    everyone: list[dict[str, list[list[float]]]] = group.all_gather_object(runs)
    group.barrier()
    group.destroy()
    return everyone


def summarize(everyone: list[dict[str, list[list[float]]]], skip: int) -> dict[str, dict]:
    """Per variant: departure spreads (us) and the loop's time per barrier (us), over both runs
    of it, the first ``skip`` barriers of each run left out (warm-up)."""
    out = {}
    for how in VARIANTS:
        spreads, periods = [], []
        for run in range(len(everyone[0][how])):
            ranks = [stamps[how][run] for stamps in everyone]
            count = len(ranks[0])
            spreads += [
                max(r[i] for r in ranks) - min(r[i] for r in ranks) for i in range(skip, count)
            ]
            periods.append((ranks[0][-1] - ranks[0][skip]) / (count - 1 - skip))
        spreads.sort()
        out[how] = {
            "spread_median_us": statistics.median(spreads) * 1e6,
            "spread_p90_us": spreads[int(0.9 * len(spreads))] * 1e6,
            "spread_max_us": spreads[-1] * 1e6,
            "per_barrier_us": statistics.median(periods) * 1e6,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="gloo")
    parser.add_argument("--devices", type=int, default=2, help="processes (one per GPU on NCCL)")
    parser.add_argument("--barriers", type=int, default=300, help="per variant and run")
    args = parser.parse_args(argv)
    if args.barriers < 20:
        parser.error("--barriers must be >= 20 (the first 10 of each run warm up)")
    if args.backend == "nccl" and torch.cuda.device_count() < args.devices:
        parser.error(f"--devices {args.devices} but only {torch.cuda.device_count()} CUDA devices")
    everyone = run_ranks(_worker, args.devices, args, timeout_s=600)[0]
    table = summarize(everyone, skip=10)
    device = torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu"
    print(f"{args.devices} x {device}, {args.backend}, {args.barriers} barriers x 2 runs")
    print(
        f"{'variant':<8} {'spread median us':>17} {'p90 us':>8} {'max us':>8} {'per barrier us':>15}"
    )
    for how in VARIANTS:
        row = table[how]
        print(
            f"{how:<8} {row['spread_median_us']:17.0f} {row['spread_p90_us']:8.0f} "
            f"{row['spread_max_us']:8.0f} {row['per_barrier_us']:15.0f}"
        )
    raw, lib = table["raw"], table["library"]
    print(
        f"raw / library: spread median {raw['spread_median_us'] / lib['spread_median_us']:.1f}x, "
        f"per barrier {raw['per_barrier_us'] / lib['per_barrier_us']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
