"""Build / rebuild / destroy latency of StatelessGroup vs the raw torch backend, side by side.

Raw = what a hand-written stateless group does: ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` on a
``PrefixStore`` of the job's long-lived TCPStore, plus a first all-reduce. Library =
``StatelessGroup(...)`` plus the same first all-reduce. Both run in the same processes,
interleaved (raw, library, raw, ...) so drift hits both alike. Each measurement starts after a
barrier on a control group and counts the slowest rank.

    python benchmarks/bench_groups.py --devices 4                    # gloo on CPU
    python benchmarks/bench_groups.py --backend nccl --devices 4     # one process per GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ranks import run_ranks

from elastic_ep.groups import Rendezvous, StatelessGroup


def _raw_group(store: dist.Store, rank: int, size: int, backend: str, timeout_s: float) -> Any:
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, opts)


def _first_collective(all_reduce: Any, device: torch.device) -> None:
    t = torch.ones(1, device=device)
    all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(
    rank: int, port: int, size: int, backend: str, reps: int
) -> dict[str, list[float]] | None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.ones(1, device=device)  # CUDA context outside the timed region
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=120)
    control = StatelessGroup(rdzv, "control", 0, rank, size, timeout_s=120)
    times: dict[str, list[float]] = {
        "raw_build": [],
        "lib_build": [],
        "raw_destroy": [],
        "lib_destroy": [],
    }

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        control.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    for i in range(reps):
        # raw
        control.barrier()
        start = time.perf_counter()
        raw = _raw_group(dist.PrefixStore(f"raw/{i}", rdzv.store), rank, size, backend, 60)
        _first_collective(lambda t, pg=raw: pg.allreduce([t]).wait(), device)
        times["raw_build"].append(slowest(time.perf_counter() - start))
        control.barrier()
        start = time.perf_counter()
        raw.shutdown()
        del raw
        times["raw_destroy"].append(slowest(time.perf_counter() - start))
        # library
        control.barrier()
        start = time.perf_counter()
        lib = StatelessGroup(rdzv, "bench", i, rank, size, backend, device, timeout_s=60)
        _first_collective(lib.all_reduce, device)
        times["lib_build"].append(slowest(time.perf_counter() - start))
        control.barrier()
        start = time.perf_counter()
        lib.destroy()
        del lib
        times["lib_destroy"].append(slowest(time.perf_counter() - start))
    control.barrier()
    control.destroy()
    return times if rank == 0 else None


def _ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    """Cold build = first repetition; rebuild/destroy = median of the others (ms)."""
    res = {
        "raw_cold_build_ms": 1e3 * times["raw_build"][0],
        "lib_cold_build_ms": 1e3 * times["lib_build"][0],
        "raw_rebuild_ms": _ms(times["raw_build"][1:]),
        "lib_rebuild_ms": _ms(times["lib_build"][1:]),
        "raw_destroy_ms": _ms(times["raw_destroy"][1:]),
        "lib_destroy_ms": _ms(times["lib_destroy"][1:]),
    }
    res["rebuild_ratio"] = res["lib_rebuild_ms"] / res["raw_rebuild_ms"]
    res["destroy_ratio"] = res["lib_destroy_ms"] / max(res["raw_destroy_ms"], 1e-9)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument(
        "--devices", type=int, default=4, help="number of processes (GPUs for nccl)"
    )
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--json", help="write the results to this path")
    args = parser.parse_args()
    if args.devices < 1 or args.reps < 2:
        parser.error("--devices must be >= 1 and --reps >= 2")
    if args.backend == "nccl" and torch.cuda.device_count() < args.devices:
        parser.error(f"--devices {args.devices} but only {torch.cuda.device_count()} GPUs")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ranks = run_ranks(_worker, args.devices, args.devices, args.backend, args.reps, timeout_s=600)
    times = ranks[0]  # rank 0 reports the slowest rank's times
    res = summarize(times)
    print(f"\n{args.backend}, {args.devices} processes, {args.reps} reps (slowest rank; ms)")
    print(f"{'':14}{'raw torch':>12}{'StatelessGroup':>16}{'ratio':>8}")
    print(f"{'cold build':14}{res['raw_cold_build_ms']:12.2f}{res['lib_cold_build_ms']:16.2f}")
    print(
        f"{'rebuild (med)':14}{res['raw_rebuild_ms']:12.2f}{res['lib_rebuild_ms']:16.2f}{res['rebuild_ratio']:8.3f}"
    )
    print(f"{'destroy (med)':14}{res['raw_destroy_ms']:12.3f}{res['lib_destroy_ms']:16.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "backend": args.backend,
                    "devices": args.devices,
                    "reps": args.reps,
                    **res,
                    "raw": times,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
