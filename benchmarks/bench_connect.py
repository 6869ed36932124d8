"""What a fresh NCCL communicator costs before it carries expert-parallel traffic, step by step.

A scale event's time on NCCL is mostly not data: a new communicator is created, then NCCL
connects peers lazily at the first collective (rings and trees) and at the first point-to-point
transfer to each peer (the all-to-all of the MoE layer, the executor's transfers). This bench
times each step on a fresh ``StatelessGroup(connect=False)`` (the library's own build), slowest
rank, after a barrier on a gloo control group:

* ``build``: communicator creation (``ncclCommInitRank``, no GPU work);
* ``first_all_reduce``: 4 bytes, connects rings/trees;
* ``first_all_to_all``: 4 bytes per peer, connects every pair for point-to-point;
* ``warm_all_to_all``: the same again (what connection costs is the difference);
* ``first_all_to_all_<N>m`` (``--connect-mib``), then ``first_ring_<M>m`` and ``warm_ring_<M>m``
  (``--mb``): whether larger messages, which use more channels, still connect some at their
  first use (on H200, with cuMem off, they did not);
* ``shrink``: where torch's ProcessGroupNCCL has ``shrink`` (``ncclCommShrink``), a communicator
  without the last rank, from the connected one, and its first all-reduce and all-to-all.

and the bandwidth of the patterns the executor uses, on the connected communicator: a ring (one
peer each way), an all-to-all of one message per peer, and the same bytes as one message per
expert weight (``--row-mb``). Run it once per NCCL setting (``--env NAME=VALUE,...``; NCCL reads
its settings once per process). ``--stress N`` then runs N rounds of the hazard the scaling
docs describe: a second thread builds and uses a new communicator on its own CUDA stream while
the main thread runs all-to-alls on the first; a round that does not finish in time counts as a
hang.

    python benchmarks/bench_connect.py --devices 4 [--env NCCL_RUNTIME_CONNECT=0] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from ranks import run_ranks

from elastic_ep.groups import Rendezvous, StatelessGroup


class _Clock:
    """Times steps as the slowest rank sees them, each after a barrier on the control group."""

    def __init__(self, control: StatelessGroup, device: torch.device) -> None:
        self.control, self.device = control, device
        self.times: dict[str, float] = {}

    def step(self, name: str, fn: Any) -> Any:
        self.control.barrier()
        start = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        self.control.all_reduce(t, op=dist.ReduceOp.MAX)
        self.times[name] = float(t.item())
        return out


def _tiny_all_to_all(group: StatelessGroup) -> None:
    token = torch.zeros(group.world_size, dtype=torch.int32, device=group.device)
    group.all_to_all_single(torch.empty_like(token), token)


def _all_to_all(group: StatelessGroup, mib_per_peer: int) -> None:
    data = torch.zeros(
        group.world_size * (mib_per_peer << 20), dtype=torch.uint8, device=group.device
    )
    group.all_to_all_single(torch.empty_like(data), data)


def _ring_once(group: StatelessGroup, mib: int) -> None:
    n, me = group.world_size, group.rank
    data = torch.ones(mib << 20, dtype=torch.uint8, device=group.device)
    group.batch_p2p([(data, (me + 1) % n)], [(torch.empty_like(data), (me - 1) % n)])


def _bandwidth(clock: _Clock, group: StatelessGroup, args: argparse.Namespace) -> dict[str, Any]:
    """GB/s per GPU (bytes each rank sends / time) of the ring, the one-message all-to-all and the
    per-row all-to-all, median of ``--repeats``; plus the host time to post the per-row batch."""
    n, me, dev = group.world_size, group.rank, group.device
    total = args.mb << 20
    buf_out = torch.ones(total, dtype=torch.uint8, device=dev)
    buf_in = torch.empty_like(buf_out)
    peers = [p for p in range(n) if p != me]
    per_peer = total // len(peers) // 256 * 256
    row = args.row_mb << 20
    rows_per_peer = max(1, per_peer // row)

    def ring() -> None:
        group.batch_p2p([(buf_out, (me + 1) % n)], [(buf_in, (me - 1) % n)])

    def a2a_big() -> None:
        sends = [(buf_out[i * per_peer : (i + 1) * per_peer], p) for i, p in enumerate(peers)]
        recvs = [(buf_in[i * per_peer : (i + 1) * per_peer], p) for i, p in enumerate(peers)]
        group.batch_p2p(sends, recvs)

    post_s: list[float] = []

    def a2a_rows() -> None:
        start = time.perf_counter()
        sends, recvs = [], []
        for i, p in enumerate(peers):
            for r in range(rows_per_peer):
                at = i * per_peer + r * row
                sends.append((buf_out[at : at + row], p))
                recvs.append((buf_in[at : at + row], p))
        handle = group.batch_p2p(sends, recvs, async_op=True)
        post_s.append(time.perf_counter() - start)
        assert handle is not None
        handle.wait()

    out: dict[str, Any] = {}
    for name, fn, nbytes in (
        ("ring", ring, total),
        ("a2a_one_message", a2a_big, per_peer * len(peers)),
        ("a2a_per_row", a2a_rows, row * rows_per_peer * len(peers)),
    ):
        fn()  # warm-up
        seconds = []
        for _ in range(args.repeats):
            clock.step(name, fn)
            seconds.append(clock.times.pop(name))
        out[f"{name}_gbps"] = nbytes / statistics.median(seconds) / 1e9
    out["a2a_per_row_messages_per_rank"] = 2 * rows_per_peer * len(peers)
    out["a2a_per_row_post_ms"] = 1e3 * statistics.median(post_s)
    return out


def _shrink(clock: _Clock, group: StatelessGroup) -> dict[str, Any]:
    backend = group.process_group._get_backend(group.device)
    if not hasattr(backend, "shrink"):
        return {"shrink": "ProcessGroupNCCL has no shrink in this torch"}
    last = group.world_size - 1
    if group.rank == last:  # the excluded rank sits out the three timed steps
        for _ in range(3):
            clock.control.barrier()
            clock.control.all_reduce(torch.zeros(1, dtype=torch.float64), op=dist.ReduceOp.MAX)
        return {}
    shrunk = clock.step("shrink", lambda: backend.shrink([last], 0, None))
    token = torch.ones(1, device=group.device)
    clock.step("shrunk_first_all_reduce", lambda: shrunk.allreduce([token]).wait())
    a = torch.zeros(group.world_size - 1, dtype=torch.int32, device=group.device)
    clock.step(
        "shrunk_first_all_to_all",
        lambda: shrunk.alltoall_base(torch.empty_like(a), a, [], []).wait(),
    )
    return {}


def _stress(
    rdzv: Rendezvous,
    control: StatelessGroup,
    group: StatelessGroup,
    rounds: int,
    limit_s: float,
    ring_mb: int,
) -> dict[str, Any]:
    """Main thread: all-to-alls on ``group`` with a host sync each (an engine's dispatch).
    Second thread, on its own stream: build a new communicator, all-reduce, all-to-all, a ring
    of ``ring_mb`` MiB. Returns how many rounds finished, and how long the second thread's work
    took."""
    results: list[float] = []
    failures: list[str] = []
    for r in range(rounds):
        done = threading.Event()

        def staging(r: int = r, done: threading.Event = done) -> None:
            try:
                cuda = group.device.type == "cuda"
                stream = torch.cuda.Stream(group.device) if cuda else None
                with (
                    torch.cuda.device(group.device) if cuda else contextlib.nullcontext(),
                    torch.cuda.stream(stream) if cuda else contextlib.nullcontext(),
                ):
                    start = time.perf_counter()
                    fresh = StatelessGroup(
                        rdzv,
                        "stress",
                        r,
                        group.rank,
                        group.world_size,
                        group.backend,
                        group.device,
                        timeout_s=limit_s,
                        connect=False,
                    )
                    fresh.all_reduce(torch.ones(1, device=group.device))
                    _tiny_all_to_all(fresh)
                    data = torch.ones(ring_mb << 20, dtype=torch.uint8, device=group.device)
                    n, me = fresh.world_size, fresh.rank
                    fresh.batch_p2p(
                        [(data, (me + 1) % n)], [(torch.empty_like(data), (me - 1) % n)]
                    )
                    if stream is not None:
                        stream.synchronize()
                    results.append(time.perf_counter() - start)
                    fresh.destroy()
            except Exception as exc:  # reported, not raised: the main thread decides
                failures.append(f"round {r}: {exc!r}")
            finally:
                done.set()

        control.barrier()
        thread = threading.Thread(target=staging, daemon=True)
        thread.start()
        steps = 0
        deadline = time.perf_counter() + limit_s
        while True:
            # [every rank's staging is done, -(some rank is past its deadline)]
            flags = torch.tensor(
                [int(done.is_set()), -int(time.perf_counter() > deadline)], dtype=torch.int64
            )
            control.all_reduce(flags, op=dist.ReduceOp.MIN)
            if flags[0].item():
                break
            if flags[1].item():
                failures.append(f"round {r}: not done in {limit_s} s (hang)")
                break
            counts = torch.full((group.world_size,), steps % 7 + 1, device=group.device)
            received = torch.empty_like(counts)
            group.all_to_all_single(received, counts)
            received.tolist()  # host sync, as a dispatch's split sizes need
            steps += 1
        if failures:
            break
    return {
        "stress_rounds_done": len(results),
        "stress_failures": failures,
        "stress_staging_ms_median": 1e3 * statistics.median(results) if results else None,
    }


def _worker(rank: int, port: int, args: argparse.Namespace) -> dict[str, Any] | None:
    for item in filter(None, args.env.split(",")):
        name, _, value = item.partition("=")
        os.environ[name] = value
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.ones(1, device=device)  # CUDA context outside the timed steps
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=120)
    control = StatelessGroup(rdzv, "control", 0, rank, args.devices, "gloo", timeout_s=120)
    clock = _Clock(control, device)
    result: dict[str, Any] = {}
    groups = []
    for attempt in ("first", "second"):
        group = clock.step(
            f"{attempt}_build",
            lambda a=attempt: StatelessGroup(
                rdzv,
                f"bench-{a}",
                0,
                rank,
                args.devices,
                args.backend,
                device,
                timeout_s=60,
                connect=False,
            ),
        )
        token = torch.ones(1, device=device)
        clock.step(f"{attempt}_first_all_reduce", lambda g=group, t=token: g.all_reduce(t))
        clock.step(f"{attempt}_first_all_to_all", lambda g=group: _tiny_all_to_all(g))
        clock.step(f"{attempt}_warm_all_to_all", lambda g=group: _tiny_all_to_all(g))
        # Does a larger message (more channels) connect more at its first use? (H200: no.)
        for mib in args.connect_mib:
            clock.step(
                f"{attempt}_first_all_to_all_{mib}m", lambda g=group, m=mib: _all_to_all(g, m)
            )
        clock.step(f"{attempt}_first_ring_{args.mb}m", lambda g=group: _ring_once(g, args.mb))
        clock.step(f"{attempt}_warm_ring_{args.mb}m", lambda g=group: _ring_once(g, args.mb))
        groups.append(group)
    result.update(_bandwidth(clock, groups[-1], args))
    if args.devices > 2 and args.backend == "nccl":
        result.update(_shrink(clock, groups[-1]))
    if args.stress:
        result.update(_stress(rdzv, control, groups[0], args.stress, args.stress_limit_s, args.mb))
    result.update({k: 1e3 * v for k, v in clock.times.items()})  # ms
    control.barrier()
    for g in groups:
        g.destroy()
    control.destroy()
    return result if rank == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=torch.cuda.device_count())
    parser.add_argument(
        "--backend", choices=("nccl", "gloo"), default="nccl", help="gloo: a CPU smoke run"
    )
    parser.add_argument("--env", default="", help="NAME=VALUE,... set in every rank before NCCL")
    parser.add_argument("--mb", type=int, default=1024, help="MiB each rank sends per pattern")
    parser.add_argument(
        "--connect-mib",
        type=int,
        nargs="*",
        default=[1, 16],
        help="after the tiny all-to-all: first all-to-alls of these MiB per peer, in order",
    )
    parser.add_argument("--row-mb", type=int, default=8, help="MiB per message, per-row pattern")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stress", type=int, default=0, help="rounds of the concurrency check")
    parser.add_argument("--stress-limit-s", type=float, default=20.0)
    parser.add_argument("--json", help="append the result as one JSON line")
    args = parser.parse_args(argv)
    if args.devices < 2 or (args.backend == "nccl" and torch.cuda.device_count() < args.devices):
        print(f"bench_connect needs {args.devices} >= 2 devices")
        return 1
    try:
        result = run_ranks(_worker, args.devices, args)[0]
    except RuntimeError as err:
        print(f"a rank failed; no result: {err}")
        return 1
    result = {
        "devices": args.devices,
        "env": args.env,
        "gpu": torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu",
        **result,
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.1f}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
