"""Benchmark the EPLB executor against raw point-to-point bandwidth measured in the same run.

DeepSeek-V2-Lite-sized experts by default: 26 MoE layers, 64 experts, bf16 ``w13`` [2*1408, 2048]
and ``w2`` [2048, 1408] per expert (17.3 MB). Scenarios, each run in one process per device:

* ``reshuffle``: a new random placement (anchor planners move about this much);
* ``drift10``: 10% of the slots get another expert;
* ``up N-1->N``: a rank joins, the survivors keep their slots, the joiner is filled;
* ``down N->N-1``: a rank leaves, the experts only it held are rehomed on survivors.

Raw baselines: a ring exchange (every rank sends ``--raw-mb`` to its right neighbour and receives
as much from its left) through ``StatelessGroup.batch_p2p`` and through torch's own default
process group (``torch.distributed.batch_isend_irecv``). Before every timed run of a scenario the
ring runs both ways, so each scenario has a raw figure of the same minutes ("raw ring": per way
the median over the scenario's runs, the faster way's, of the slowest rank; the scenario's time
is a median over the same runs); "% raw" divides by it. NCCL's ring
rate moved 275-335 GB/s from one run to the next on one machine, so a raw figure taken once at
the start could be off by 10% for a scenario timed later. The start of a run also measures both
rings once, and an all-to-all of one message to and from every peer (``StatelessGroup.batch_p2p``,
256-byte aligned parts), the pattern of a reshuffle's chunk.

"Per-GPU bandwidth" of a scenario is the busiest rank's traffic (max over ranks of the bytes it
sends or receives, whichever is larger) divided by the wall time; for the ring it is the bytes each
rank sends divided by the wall time. Extra memory is ``max_memory_allocated`` during ``execute``
minus the memory allocated before it (CUDA), or the executor's own count (CPU).

Usage::

    python benchmarks/bench_executor.py --backend nccl --devices 4 [--json out.json]
    python benchmarks/bench_executor.py --backend gloo --devices 2 --small

By default every scenario runs with every copy path of ``execute`` the backend can run (``--copy
all``), side by side: ``torch`` (multi-tensor copies), and on CUDA ``triton`` (one fused gather /
scatter kernel launch per chunk) and ``engine`` (one batch of copy-engine copies per chunk); and
each both ways (``--mode both``): ``execute`` (its host work included) and ``prepared`` (the run
of a ``prepare_execution`` done before the timed region); ``--mode all`` adds ``checked`` (also
``PreparedExecution.check`` before the timed region, so the run skips the plan check's round
trip). ``start ms`` is the median ``first_transfer_seconds``: from the call to the first
transfer posted.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from ranks import run_ranks

from elastic_ep.eplb import (
    EMPTY,
    Placement,
    TransferPlan,
    execute,
    plan_transfers,
    prepare_execution,
    row_copy,
)
from elastic_ep.eplb.copy_engine import engine_available
from elastic_ep.eplb.row_copy import triton_available
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.rank_mapping import RankMapping


# ---- placements ------------------------------------------------------------------------------
def random_placement(
    rng: random.Random, layers: int, experts: int, ranks: int, slots: int
) -> Placement:
    """Every expert once per layer, the remaining slots random replicas."""
    rows = []
    for _ in range(layers):
        row = list(range(experts)) + [
            rng.randrange(experts) for _ in range(ranks * slots - experts)
        ]
        rng.shuffle(row)
        rows.append(row)
    return Placement(torch.tensor(rows), experts, ranks)


def drift(rng: random.Random, p: Placement, fraction: float) -> Placement:
    """Rewrite ``fraction`` of the slots, keeping every expert placed."""
    rows = p.phy2log.tolist()
    for row in rows:
        for i in rng.sample(range(len(row)), round(fraction * len(row))):
            row[i] = rng.randrange(p.num_logical)
        _repair(row, p.num_logical)
    return Placement(torch.tensor(rows), p.num_logical, p.num_ranks)


def _repair(row: list[int], experts: int) -> None:
    first: dict[int, int] = {}
    for i, e in enumerate(row):
        first.setdefault(e, i)
    spare = [i for i, e in enumerate(row) if e == EMPTY or first[e] != i]
    for e, i in zip(sorted(set(range(experts)) - set(row)), spare, strict=False):
        row[i] = e


def scale_up(rng: random.Random, p: Placement) -> tuple[Placement, RankMapping]:
    """One rank joins at the end; survivors keep their slots, the joiner gets random replicas."""
    s = p.slots_per_rank
    rows = [row + [rng.randrange(p.num_logical) for _ in range(s)] for row in p.phy2log.tolist()]
    return Placement(torch.tensor(rows), p.num_logical, p.num_ranks + 1), RankMapping.resize(
        p.num_ranks, p.num_ranks + 1
    )


def scale_down(p: Placement) -> tuple[Placement, RankMapping]:
    """The last rank leaves; experts only it held replace duplicates on the survivors."""
    s = p.slots_per_rank
    rows = [row[: (p.num_ranks - 1) * s] for row in p.phy2log.tolist()]
    for row in rows:
        _repair(row, p.num_logical)
    return Placement(torch.tensor(rows), p.num_logical, p.num_ranks - 1), RankMapping.resize(
        p.num_ranks, p.num_ranks - 1
    )


# ---- one process per device ----------------------------------------------------------------
def _weights(
    layers: int, slots: int, shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype
) -> list[list[torch.Tensor]]:
    return [
        [torch.ones((slots, *shape), dtype=dtype, device=device) for shape in shapes]
        for _ in range(layers)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ring(
    send: torch.Tensor, recv: torch.Tensor, rank: int, world: int, how: str, group: StatelessGroup
) -> None:
    right, left = (rank + 1) % world, (rank - 1) % world
    if how == "a2a":  # the reshuffle's pattern: one message to and from every peer
        peers = [p for p in range(world) if p != rank]
        # 256-byte aligned parts: NCCL moved 2-byte aligned ones at half the rate on 4x H200
        part = send.numel() // len(peers) // 128 * 128
        group.batch_p2p(
            [(send[i * part : (i + 1) * part], p) for i, p in enumerate(peers)],
            [(recv[i * part : (i + 1) * part], p) for i, p in enumerate(peers)],
        )
    elif how == "stateless":
        group.batch_p2p([(send, right)], [(recv, left)])
    else:
        ops = [dist.P2POp(dist.isend, send, right), dist.P2POp(dist.irecv, recv, left)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_raw(
    args: argparse.Namespace, rank: int, group: StatelessGroup, device: torch.device
) -> dict[str, float]:
    nbytes = args.raw_mb << 20
    send = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    out = {}
    for how in ("stateless", "torch", "a2a"):
        seconds = _time(
            lambda how=how: _ring(send, recv, rank, args.devices, how, group), device, args.repeats
        )
        out[how] = nbytes / seconds / 1e9
    return out


def _run_scenario(
    args: argparse.Namespace,
    rank: int,
    rdzv: Rendezvous,
    epoch: int,
    name: str,
    plan: TransferPlan,
    group_ranks: int,
    numbering: str,
    device: torch.device,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    copy: str,
    mode: str,
) -> dict[str, Any] | None:
    """Time ``plan`` (and restore with the reverse plan between repeats) on ``group_ranks`` ranks:
    ``mode`` "execute" times ``execute``; "prepared" ("checked": and checked) times
    ``PreparedExecution.run`` of a
    ``prepare_execution`` done before the barrier (its buffer counts in the extra memory)."""
    if rank >= group_ranks:
        return None
    group = StatelessGroup(
        rdzv,
        f"bench-{name}-{copy}-{mode}",
        epoch,
        rank,
        group_ranks,
        args.backend,
        device,
        timeout_s=300,
    )
    mapping = plan.rank_mapping
    old = mapping.old_rank(rank) if numbering == "new" else rank
    new = rank if numbering == "new" else mapping.new_rank(rank)
    slots = max(
        plan.previous.slots_per_rank if old is not None else 0,
        plan.new.slots_per_rank if new is not None else 0,
    )
    weights = _weights(plan.new.num_layers, slots, shapes, device, dtype)
    back = plan_transfers(plan.new, plan.previous, _inverse(mapping))
    budget = args.buffer_mb << 20

    def runner() -> Any:
        """What one timed (or observed) run calls: for "prepared", the host work happens here,
        before the barrier and the clock."""
        if mode in ("prepared", "checked"):
            prepared = prepare_execution(plan, weights, group, buffer_bytes=budget, copy=copy)
            if mode == "checked":
                prepared.check()
            return prepared.run
        return functools.partial(execute, plan, weights, group, buffer_bytes=budget, copy=copy)

    ring_send = torch.ones((args.raw_mb << 20) // 2, dtype=torch.bfloat16, device=device)
    ring_recv = torch.empty_like(ring_send)
    times, peaks, starts, rings, stats = [], [], [], [], None
    for i in range(args.repeats + 1):
        ring = _ring_beside(ring_send, ring_recv, rank, group_ranks, group, device)
        _sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = runner()
        group.barrier()
        start = time.perf_counter()
        stats = run()
        _sync(device)
        elapsed = time.perf_counter() - start
        peak = (
            torch.cuda.max_memory_allocated(device) - base
            if device.type == "cuda"
            else stats.peak_extra_bytes
        )
        if i > 0:  # the first run warms up
            rings.append(ring)
            times.append(elapsed)
            peaks.append(peak)
            starts.append(stats.first_transfer_seconds)
        group.barrier()
        execute(
            back,
            weights,
            group,
            buffer_bytes=budget,
            ranks=_flip(plan, numbering),
            copy=copy,
        )
    assert stats is not None
    for tool in ("trace", "profile"):  # one more run each, not timed: what rank 0 did
        if getattr(args, tool):
            _observed(tool, args, rank, f"{name}-{copy}-{mode}", runner(), device)
    seconds = statistics.median(times)
    busiest = max(
        max(s, r)
        for s, r in zip(stats.bytes_sent_per_rank, stats.bytes_received_per_rank, strict=True)
    )
    group.barrier()
    group.destroy()
    return {
        "scenario": name,
        "copy": copy,
        "mode": mode,
        "ranks": group_ranks,
        "seconds": seconds,
        "moved_gb": sum(stats.bytes_received_per_rank) / 1e9,
        "busiest_rank_gb": busiest / 1e9,
        "gbps_per_gpu": busiest / seconds / 1e9,
        "chunks": stats.num_chunks,
        "peak_extra_mb": max(peaks) / 2**20,
        "executor_peak_mb": stats.peak_extra_bytes / 2**20,
        "buffer_mb": args.buffer_mb,
        "phase_ms": {phase.value: sec * 1e3 for phase, sec in stats.seconds},
        "total_ms": stats.total_seconds * 1e3,
        "first_transfer_ms": statistics.median(starts) * 1e3,
        # Median against median: the faster way's median (the best of two single samples per
        # run, as before the tenth session, came out 0-2% faster on 4x and 2x H200).
        "ring_gbps": ring_send.numel()
        * ring_send.element_size()
        / min(statistics.median(way) for way in zip(*rings, strict=True))
        / 1e9,
        "ring_best_of_two_gbps": ring_send.numel()
        * ring_send.element_size()
        / statistics.median(min(pair) for pair in rings)
        / 1e9,
    }


def _ring_beside(
    send: torch.Tensor,
    recv: torch.Tensor,
    rank: int,
    world: int,
    group: StatelessGroup,
    device: torch.device,
) -> tuple[float, float]:
    """Seconds of one raw ring exchange each way, just before a timed run: the raw figure of
    the same minutes (NCCL's ring rate moved 275-335 GB/s between runs on one machine). Through
    ``StatelessGroup.batch_p2p`` and through torch's ``batch_isend_irecv`` (the default process
    group), each timed on its second exchange, when the ranks are in step."""
    seconds = []
    for how in ("stateless", "torch"):
        group.barrier()
        _ring(send, recv, rank, world, how, group)
        _sync(device)
        start = time.perf_counter()
        _ring(send, recv, rank, world, how, group)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1]


def _observed(
    tool: str, args: argparse.Namespace, rank: int, label: str, run: Any, device: torch.device
) -> None:
    """Run ``run`` on every rank; on rank 0 under ``tool``: ``"profile"`` appends the top host
    functions by own time (cProfile) to ``--profile``; ``"trace"`` writes a Chrome trace (CPU ops
    and CUDA kernels per stream, torch.profiler) to ``--trace``/<label>.json."""
    import contextlib
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    if rank != 0:
        run()
        _sync(device)
        return
    if tool == "profile":
        observer: Any = cProfile.Profile()
        context: Any = contextlib.nullcontext()
        observer.enable()
    else:
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        observer = context = profile(activities=activities)
    with context:
        run()
        _sync(device)
    if tool == "profile":
        observer.disable()
        text = io.StringIO()
        pstats.Stats(observer, stream=text).sort_stats("tottime").print_stats(25)
        with open(args.profile, "a") as f:
            f.write(f"==== {label}\n{text.getvalue()}\n")
    else:
        os.makedirs(args.trace, exist_ok=True)
        name = label.replace(" ", "_").replace(">", "")
        observer.export_chrome_trace(os.path.join(args.trace, f"{name}.json"))


def _inverse(mapping: RankMapping) -> RankMapping:
    return RankMapping(mapping.new_to_old, mapping.old_world_size)


def _flip(plan: TransferPlan, numbering: str) -> Any:
    """GroupRanks for the reverse plan on the same group."""
    from elastic_ep.eplb import GroupRanks

    forward = (
        GroupRanks.new_numbering(plan.rank_mapping)
        if numbering == "new"
        else GroupRanks.old_numbering(plan.rank_mapping)
    )
    return GroupRanks(forward.new, forward.old)


def _scenarios(args: argparse.Namespace) -> list[tuple[str, TransferPlan, int, str]]:
    rng = random.Random(args.seed)
    n, e, layers = args.devices, args.experts, args.layers
    slots = math.ceil(args.slots / n)
    base = random_placement(rng, layers, e, n, slots)
    out = [
        ("reshuffle", plan_transfers(base, random_placement(rng, layers, e, n, slots)), n, "new"),
        ("drift10", plan_transfers(base, drift(rng, base, 0.10)), n, "new"),
    ]
    if n >= 2:
        s = math.ceil(e / (n - 1))
        small = random_placement(rng, layers, e, n - 1, s)
        grown, up = scale_up(rng, small)
        out.append((f"up {n - 1}->{n}", plan_transfers(small, grown, up), n, "new"))
        big = random_placement(rng, layers, e, n, s)
        shrunk, down = scale_down(big)
        out.append((f"down {n}->{n - 1}", plan_transfers(big, shrunk, down), n, "old"))
    return out


def _copy_paths(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``--copy all``: the multi-tensor path, and the fused ones where they can run."""
    if args.copy != "all":
        return [args.copy]
    if args.backend != "nccl":
        return ["torch"]
    fused = ["triton"] if triton_available() else []
    return ["torch", *fused, *(["engine"] if engine_available(device) else [])]


def _worker(rank: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if args.triton_grid:  # an A/B knob of this benchmark: the kernel reads these per launch
        share, warps, *block = args.triton_grid.split("x")
        row_copy.SM_SHARE, row_copy.NUM_WARPS = float(share), int(warps)
        if block:
            row_copy.BLOCK = int(block[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # ranks share the CPU cores: oversubscribed OpenMP threads spin and stall
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=300)
    dist.init_process_group(  # torch's own group, for its batch_isend_irecv ring
        args.backend,
        store=dist.PrefixStore("torch-default", rdzv.store),
        rank=rank,
        world_size=args.devices,
        timeout=timedelta(seconds=300),
        device_id=device if device.type == "cuda" else None,
    )
    group = StatelessGroup(
        rdzv, "bench-raw", 0, rank, args.devices, args.backend, device, timeout_s=300
    )
    result: dict[str, Any] = {"raw": _measure_raw(args, rank, group, device), "scenarios": []}
    dtype = torch.bfloat16
    shapes: list[tuple[int, ...]] = [
        (2 * args.intermediate, args.hidden),
        (args.hidden, args.intermediate),
    ]
    modes = {"both": ["execute", "prepared"], "all": ["execute", "prepared", "checked"]}.get(
        args.mode, args.mode.split(",")
    )
    runs = [
        (s, copy, mode)
        for s in _scenarios(args)
        if args.scenarios is None or s[0].split()[0] in args.scenarios.split(",")
        for copy in _copy_paths(args, device)
        for mode in modes
    ]
    for epoch, ((name, plan, ranks, numbering), copy, mode) in enumerate(runs):
        row = _run_scenario(
            args, rank, rdzv, epoch, name, plan, ranks, numbering, device, shapes, dtype, copy, mode
        )
        if row is not None:
            result["scenarios"].append(row)
    group.barrier()
    group.destroy()
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    parser.add_argument("--devices", type=int, default=2, help="processes (one per GPU)")
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=80, help="physical slots per layer in all")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--buffer-mb", type=int, default=2048)
    parser.add_argument("--raw-mb", type=int, default=512, help="bytes per rank in the raw ring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for gloo on a CPU")
    parser.add_argument(
        "--copy",
        choices=["all", "auto", "torch", "triton", "engine"],
        default="all",
        help="execute's copy path; 'all' runs every one the backend can, side by side",
    )
    parser.add_argument(
        "--mode",
        default="both",
        help="time execute (host work included), or the run of a prepare_execution done "
        "beforehand ('checked': and checked beforehand); 'both': the first two side by side, "
        "'all': the three; or a comma-separated list of them",
    )
    parser.add_argument(
        "--scenarios",
        help="comma-separated subset of reshuffle, drift10, up, down (default: all)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", help="append rank 0's host profile of each scenario here")
    parser.add_argument("--trace", help="write rank 0's timeline of each scenario to this folder")
    parser.add_argument(
        "--triton-grid",
        help="SHARExWARPS[xBLOCK]: the Triton copy on this share of the SMs with these warps per "
        "program (and words per program per iteration; default row_copy.SM_SHARE x NUM_WARPS x "
        "BLOCK; the kernel before 2026-11-28 was about 1.8x4)",
    )
    args = parser.parse_args(argv)
    modes = {"execute", "prepared", "checked"}
    if args.mode not in ("both", "all") and not set(args.mode.split(",")) <= modes:
        parser.error(f"--mode: 'both', 'all' or a comma-separated subset of {sorted(modes)}")
    scenarios = {"reshuffle", "drift10", "up", "down"}
    if args.scenarios and not set(args.scenarios.split(",")) <= scenarios:
        parser.error(f"--scenarios: a comma-separated subset of {sorted(scenarios)}")
    if args.small:
        args.layers, args.hidden, args.intermediate, args.raw_mb, args.buffer_mb = 4, 64, 48, 4, 1
    if args.backend == "nccl" and torch.cuda.device_count() < args.devices:
        parser.error(f"--devices {args.devices} but only {torch.cuda.device_count()} CUDA devices")
    report(args, dict(enumerate(run_ranks(_worker, args.devices, args))))
    return 0


def report(args: argparse.Namespace, results: dict[int, dict[str, Any]]) -> None:
    raw = {
        how: min(r["raw"][how] for r in results.values()) for how in ("stateless", "torch", "a2a")
    }
    rows = results[0]["scenarios"]

    def over_ranks(field: str, pick: Any) -> dict[tuple[str, str, str], float]:
        return {
            key: pick(
                s[field]
                for r in results.values()
                for s in r["scenarios"]
                if (s["scenario"], s["copy"], s["mode"]) == key
            )
            for key in {(row["scenario"], row["copy"], row["mode"]) for row in rows}
        }

    peaks, rings = over_ranks("peak_extra_mb", max), over_ranks("ring_gbps", min)
    best_of_two = over_ranks("ring_best_of_two_gbps", min)
    device = torch.cuda.get_device_name(0) if args.backend == "nccl" else "cpu"
    print(
        f"\n{args.devices} x {device}, {args.backend}, {args.layers} layers x {args.experts} experts, "
        f"buffer {args.buffer_mb} MiB"
    )
    print(
        f"raw ring P2P per GPU: StatelessGroup.batch_p2p {raw['stateless']:.1f} GB/s, "
        f"torch batch_isend_irecv {raw['torch']:.1f} GB/s; all-to-all (one message per peer, "
        f"StatelessGroup) {raw['a2a']:.1f} GB/s"
    )
    print(
        f"{'scenario':<12} {'copy':<6} {'mode':<8} {'ms':>8} {'moved GB':>9} {'busiest GB':>10} "
        f"{'GB/s/GPU':>9} {'raw ring':>8} {'% raw':>6} {'% best2':>7} {'chunks':>6} {'peak MiB':>9} "
        f"{'plan ms':>8} {'start ms':>8}"
    )
    for row in rows:
        key = (row["scenario"], row["copy"], row["mode"])
        # "% raw" is against the ring timed beside the scenario's runs (the slowest rank's).
        row["raw_ring_gbps"] = rings[key]
        row["pct_of_raw"] = 100 * row["gbps_per_gpu"] / rings[key]
        # against the former statistic: per run the faster of one sample each way
        row["pct_of_best_of_two"] = 100 * row["gbps_per_gpu"] / best_of_two[key]
        row["peak_extra_mb"] = peaks[key]
        print(
            f"{row['scenario']:<12} {row['copy']:<6} {row['mode']:<8} {row['seconds'] * 1e3:8.1f} "
            f"{row['moved_gb']:9.2f} {row['busiest_rank_gb']:10.2f} {row['gbps_per_gpu']:9.1f} "
            f"{row['raw_ring_gbps']:8.1f} {row['pct_of_raw']:6.1f} {row['pct_of_best_of_two']:7.1f} "
            f"{row['chunks']:6d} "
            f"{row['peak_extra_mb']:9.1f} {row['phase_ms']['plan']:8.2f} "
            f"{row['first_transfer_ms']:8.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "device": device, "raw_gbps_per_gpu": raw, "scenarios": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
