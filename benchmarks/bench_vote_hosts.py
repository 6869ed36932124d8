"""The poll's vote across test hosts with a per-hop delay: gloo's ring all-reduce (the blocking
poll) against the dissemination MAX (the pipelined poll's voter), and a TCPStore round trip.

Hosts are network namespaces on a private bridge (``elastic_ep.testing.netns``, root only), one
rank process per host; every frame a host sends waits ``delay`` ms (a one-way hop delay). For
each delay, each rank times each vote (median of ``--reps``, slowest rank) and rank R-1 times
one store operation on the store served by rank 0's host.

    sudo python benchmarks/bench_vote_hosts.py --hosts 4 8 --delays 0 0.05 0.2 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from elastic_ep.scaling.poll import NUM_FLAGS, dissemination_max
from elastic_ep.testing.netns import TestNetwork

PORT = 29555


def rank_main(rank: int, size: int, reps: int) -> None:
    store = dist.TCPStore(
        "10.213.0.1",
        PORT,
        is_master=rank == 0,
        timeout=timedelta(seconds=120),
        wait_for_workers=False,
    )
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in the stubs
    opts._timeout = timedelta(seconds=120)
    opts._devices = [dist.ProcessGroupGloo.create_device(interface="eth0")]
    pg = dist.ProcessGroupGloo(dist.PrefixStore("vote", store), rank, size, opts)
    maxop = dist.AllreduceOptions()
    maxop.reduceOp = dist.ReduceOp.MAX
    out: dict[str, list[float]] = {"ring": [], "dissemination": [], "store": []}
    for i in range(reps + 1):
        for name in out:
            pg.barrier().wait()
            flags = torch.zeros(NUM_FLAGS, dtype=torch.int64)
            start = time.perf_counter()
            if name == "ring":
                pg.allreduce([flags], maxop).wait()
            elif name == "dissemination":
                dissemination_max(pg, rank, size, flags, lambda w: w.wait())
            elif rank == size - 1:
                store.add("probe", 0)
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            pg.allreduce([took], maxop).wait()
            if i:  # the first round connects
                out[name].append(float(took))
    pg.barrier().wait()
    if rank == 0:
        print(json.dumps({k: 1e6 * statistics.median(v) for k, v in out.items()}), flush=True)
        time.sleep(1.0)  # the store outlives the others' last reads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[4])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.05, 0.2, 1.0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.size, args.reps)
        return 0
    rows = []
    for hosts in args.hosts:
        for delay in args.delays:
            with TestNetwork(hosts, delay_ms=delay) as net:
                procs = [
                    h.popen(
                        [
                            sys.executable,
                            __file__,
                            "--rank",
                            str(i),
                            "--size",
                            str(hosts),
                            "--reps",
                            str(args.reps),
                        ],
                        stdout=-1 if i == 0 else None,
                    )
                    for i, h in enumerate(net.hosts)
                ]
                stdout, _ = procs[0].communicate(timeout=300)
                for p in procs[1:]:
                    p.wait(timeout=60)
            row = {"hosts": hosts, "delay_ms": delay, **json.loads(stdout.decode().strip())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| hosts | delay ms | ring all-reduce us | dissemination us | store op us |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['hosts']} | {r['delay_ms']:g} | {r['ring']:.0f} | {r['dissemination']:.0f} | "
            f"{r['store']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
