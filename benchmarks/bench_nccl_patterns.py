"""What one batch of point-to-point transfers costs NCCL, by the shape of its pair matrix.

The executor posts each chunk as one batch (``StatelessGroup.batch_p2p``): every rank sends one
message to, and receives one from, each peer it trades with. This times such batches for given
``[sender][receiver]`` matrices of MB, each on its own after a barrier (median of ``--repeats``,
the slowest rank's): a ring (one peer), all-to-alls with even pairs, even per-rank totals split
unevenly over the peers (circulants: the same split for every rank, by peer offset), and on 4
ranks two chunks of the benchmark's 10% drift (``bench_executor.py``, seed 0) as cut by the
executor, as they are and scaled. ``--rounds`` also times each pattern as one batch per peer
offset, posted back to back (rank r sends to r+s and receives from r-s in round s).

GB/s is the busiest rank's traffic (max of bytes sent and received) over the time.

    python benchmarks/bench_nccl_patterns.py --devices 4 [--rounds]
    python benchmarks/bench_nccl_patterns.py --backend gloo --devices 4 --scale 0.01
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from ranks import run_ranks

from elastic_ep.groups import Rendezvous, StatelessGroup

MB = 1 << 20

Matrix = list[list[float]]
"""MB per ``[sender][receiver]`` pair."""

# The 4x drift's chunks 2 and 3 (busiest ranks 560 and 395 MB) as the executor cut them.
DRIFT_CHUNK2: Matrix = [[0, 165, 99, 99], [148, 0, 115, 132], [115, 181, 0, 66], [165, 214, 132, 0]]
DRIFT_CHUNK3: Matrix = [[0, 115, 82, 49], [99, 0, 49, 99], [82, 132, 0, 66], [99, 148, 99, 0]]


def patterns(n: int) -> dict[str, Matrix]:
    """Name -> MB per ``[sender][receiver]`` pair."""

    def even(total: float) -> Matrix:
        return [[0 if a == b else total / (n - 1) for b in range(n)] for a in range(n)]

    def by_offset(*mb: float) -> Matrix:  # mb[s - 1] to the peer at offset s
        return [[0 if a == b else mb[(b - a) % n - 1] for b in range(n)] for a in range(n)]

    def scaled(m: Matrix, factor: float) -> Matrix:
        return [[v * factor for v in row] for row in m]

    out = {
        "ring 512": by_offset(512, *[0] * (n - 2)),
        "even 396": even(396),
        "even 560": even(560),
    }
    if n == 4:
        out |= {
            "offsets 198/132/66": by_offset(198, 132, 66),
            "offsets 264/99/33": by_offset(264, 99, 33),
            "offsets 132/198/66": by_offset(132, 198, 66),
            "offsets 66/132/198": by_offset(66, 132, 198),
            "drift chunk 2": DRIFT_CHUNK2,
            "drift chunk 3": DRIFT_CHUNK3,
            "drift chunk 2 x0.705": scaled(DRIFT_CHUNK2, 0.705),
            "drift chunk 3 x1.42": scaled(DRIFT_CHUNK3, 1.42),
        }
    return out


def _busiest(m: Matrix) -> float:
    """The most MB a rank sends or receives."""
    return max(max(sum(row) for row in m), max(sum(column) for column in zip(*m, strict=True)))


def _parts(buffer: torch.Tensor, sizes_mb: list[float]) -> list[torch.Tensor]:
    """Consecutive 256-byte aligned slices of ``buffer`` (NCCL moved 2-byte aligned parts at
    half the rate on 4x H200)."""
    parts, at = [], 0
    for mb in sizes_mb:
        nbytes = int(mb * MB) // 256 * 256
        parts.append(buffer[at : at + nbytes])
        at += nbytes
    return parts


def _worker(
    rank: int, port: int, args: argparse.Namespace
) -> dict[tuple[str, str], tuple[float, float]]:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    n = args.devices
    if args.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=120)
    group = StatelessGroup(rdzv, "patterns", 0, rank, n, args.backend, device, timeout_s=120)
    table = {name: [[v * args.scale for v in row] for row in m] for name, m in patterns(n).items()}
    largest = max(_busiest(m) for m in table.values())
    send_buffer = torch.ones(int(largest * MB) + 256 * n, dtype=torch.uint8, device=device)
    recv_buffer = torch.empty_like(send_buffer)
    peers = [p for p in range(n) if p != rank]
    results = {}
    for name, m in table.items():
        sends = dict(zip(peers, _parts(send_buffer, [m[rank][p] for p in peers]), strict=True))
        recvs = dict(zip(peers, _parts(recv_buffer, [m[p][rank] for p in peers]), strict=True))
        batches = {
            "one batch": [
                group.prepare_p2p(
                    [(sends[p], p) for p in peers if sends[p].numel()],
                    [(recvs[p], p) for p in peers if recvs[p].numel()],
                )
            ]
        }
        if args.rounds:
            rounds = []
            for s in range(1, n):
                to, frm = (rank + s) % n, (rank - s) % n
                send = [(sends[to], to)] if sends[to].numel() else []
                recv = [(recvs[frm], frm)] if recvs[frm].numel() else []
                if send or recv:  # a pair's transfers match in posting order
                    rounds.append(group.prepare_p2p(send, recv))
            batches["rounds"] = rounds
        busiest = _busiest(m)
        for how, posts in batches.items():
            times = []
            for i in range(args.repeats + 1):
                group.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for handle in [batch.post() for batch in posts]:
                    handle.wait()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first warms up
                    times.append(time.perf_counter() - start)
            results[(name, how)] = (statistics.median(times), busiest * MB)
    group.barrier()
    group.destroy()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--devices", type=int, default=4, help="processes (one per GPU)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every pair's MB")
    parser.add_argument("--rounds", action="store_true", help="also one batch per peer offset")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error("--devices must be >= 2")
    if args.backend == "nccl" and torch.cuda.device_count() < args.devices:
        parser.error(f"--devices {args.devices} but only {torch.cuda.device_count()} CUDA devices")
    results = dict(enumerate(run_ranks(_worker, args.devices, args, timeout_s=600)))
    print(f"{args.devices} ranks, {args.backend}, pair MB x {args.scale}")
    print(f"{'pattern':<22} {'how':<10} {'busiest MB':>10} {'ms':>8} {'GB/s':>7}")
    for key in results[0]:
        seconds = max(r[key][0] for r in results.values())  # the slowest rank's
        busiest = results[0][key][1]
        print(
            f"{key[0]:<22} {key[1]:<10} {busiest / MB:10.0f} {seconds * 1e3:8.3f} "
            f"{busiest / seconds / 1e9:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
