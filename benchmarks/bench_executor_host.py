"""Host time of ``execute``'s own work on one device: layout, launches, write-back; no peer.

What the executor's host does for rank 0 of a DeepSeek-V2-Lite-sized 2-rank plan (26 layers,
64 experts, 40 slots per rank, bf16 ``w13``/``w2``; a full reshuffle and a 10% drift), with its
copies run for real on the device and the transfers left out (one device has no peer): the
layout of the chunks (``Runner.launch``, in growing batches), and each chunk's pack and
write-back launches.
Every copy path the device can run, side by side; median of ``--repeats``. On 2 GPUs this host
work runs beside the transfers, so it bounds how fast the executor can go.

    python benchmarks/bench_executor_host.py [--device cuda] [--repeats 5]

``--sweep``: the host work every rank does before a plan runs, against the number of ranks
(8 to 1024, 58 layers of 256 experts, V2-Lite-sized experts): ``plan_transfers`` (the same on
every rank) and ``prepare_execution`` (validation, chunks, this rank's layout and launches; no
communication) on ranks 0, R/2 and R-1, the slowest of them reported; CPU time (the least of
``--repeats``, half as many past 256 ranks) and peak memory, and the growth exponent between
consecutive sizes (``--plot``: a log-log text plot).

    python benchmarks/bench_executor_host.py --sweep [--ranks 8 ... 1024] [--plot] [--vs-previous]

``--vs-previous`` times ``plan_transfers`` with the step order before 2026-12-03 too
(``step_order_previous.py``, one numpy pass over every kind per pick), side by side, and prints
the ratio. ``--balance``: how even the chunks of the 4- and 2-rank DeepSeek-V2-Lite reshuffles
(``bench_executor.py``'s, seed 0, a 2 GiB buffer, overlapped) load the ranks and pairs, with
both step orders and with whole layers in order: the sum over chunks of the busiest rank's
experts (sent or received) over the busiest rank's total, and the sum of the busiest pair's.

    python benchmarks/bench_executor_host.py --balance
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import math
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import step_order_previous
import torch
from bench_executor import drift, random_placement

from elastic_ep.eplb import (
    GroupRanks,
    Phase,
    Placement,
    Step,
    Transfer,
    TransferPlan,
    plan_transfers,
    prepare_execution,
    transfer_steps,
)
from elastic_ep.eplb.copy_engine import engine_available
from elastic_ep.eplb.exec_chunks import cut_chunks
from elastic_ep.eplb.exec_layout import aligned
from elastic_ep.eplb.exec_ranks import ProcessRanks
from elastic_ep.eplb.exec_runner import Runner, Timer
from elastic_ep.eplb.row_copy import triton_available, warm_up
from elastic_ep.groups.stateless_group import StatelessGroup
from elastic_ep.rank_mapping import RankMapping


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
    parser.add_argument("--sweep", action="store_true", help="host work against ranks (CPU)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(SWEEP_RANKS))
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--min-slots", type=int, default=288, help="slots per layer at least")
    parser.add_argument("--buffer-mb", type=int, default=1024)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["drift10", "up12", "reshuffle"],
        choices=["drift10", "up12", "reshuffle"],
    )
    parser.add_argument("--plot", action="store_true", help="with --sweep: a log-log text plot")
    parser.add_argument(
        "--vs-previous", action="store_true", help="with --sweep: the previous step order too"
    )
    parser.add_argument("--balance", action="store_true", help="chunk balance of the step order")
    args = parser.parse_args(argv)
    if args.balance:
        torch.set_num_threads(1)
        return balance(args)
    if args.sweep:
        torch.set_num_threads(1)
        return sweep(args)
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
        chunks = cut_chunks(plan, row_bytes, ranks_of, budget, True)
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


SWEEP_RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
V2_LITE_SHAPES = ((2 * 1408, 2048), (2048, 1408))
"""Per-slot bf16 ``w13`` and ``w2`` of DeepSeek-V2-Lite (17.3 MB an expert)."""


class _HostOnlyGroup(StatelessGroup):
    """One rank's view of a group of ``world_size`` ranks with no communicator: what
    ``prepare_execution`` reads of a group (rank, size, device) and ``prepare_p2p``'s checks."""

    def __init__(self, rank: int, world_size: int) -> None:  # no rendezvous
        self._name, self._epoch, self._rank, self._world_size = "host", 0, rank, world_size
        self._device = torch.device("cpu")

    def _usable(self, op: str) -> Any:
        return None


def _sweep_placements(
    rng: random.Random, scenario: str, layers: int, experts: int, ranks: int, slots: int
) -> tuple[Placement, Placement, RankMapping | None]:
    """``drift10``: 10% of the slots rewritten; ``up12``: 1/8 of the ranks join with random
    replicas; ``reshuffle``: two unrelated placements."""
    if scenario == "up12":
        before = ranks - ranks // 8
        slots = max(slots, -(-experts // before))
        previous = random_placement(rng, layers, experts, before, slots)
        rows = [
            row + [rng.randrange(experts) for _ in range((ranks - before) * slots)]
            for row in previous.phy2log.tolist()
        ]
        new = Placement(torch.tensor(rows), experts, ranks)
        return previous, new, RankMapping.resize(before, ranks)
    previous = random_placement(rng, layers, experts, ranks, slots)
    if scenario == "drift10":
        return previous, drift(rng, previous, 0.1), None
    return previous, random_placement(rng, layers, experts, ranks, slots), None


def _measured(fn: Callable[[], Any], repeats: int) -> tuple[float, int, Any]:
    """(least CPU seconds of this process over ``repeats`` calls, peak traced bytes of one more
    call, its result): the work is one thread's, and on a shared machine its CPU time varies
    far less than its wall time. Python objects and numpy arrays count, torch's CPU tensors
    (weights, staging buffer) do not."""
    seconds = []
    for _ in range(repeats):
        gc.collect()
        start = time.process_time()
        result = fn()
        seconds.append(time.process_time() - start)
        del result
    gc.collect()
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(seconds), peak, result


def _own_ops(plan: TransferPlan, rank: int) -> int:
    """Transfers this rank sends or receives, plus its local copies and reloads."""
    table = plan.op_table
    mine = np.count_nonzero((table.src == rank) | (table.dst == rank))
    return int(mine) + sum(op.rank == rank for op in plan.reloads)


def sweep(args: argparse.Namespace) -> int:
    """Per-rank host time and memory of ``plan_transfers`` and ``prepare_execution`` against the
    number of ranks, and the growth exponent between consecutive sizes."""
    rows: list[dict[str, Any]] = []
    print(
        f"{args.layers} layers x {args.experts} experts, V2-Lite-sized experts (17.3 MB), "
        f"buffer {args.buffer_mb} MB, CPU, one torch thread; time: least CPU time of --repeats "
        "(half as many past 256 ranks), "
        "memory: peak traced Python + numpy bytes (weights and buffer are torch's, not counted)"
    )
    header = (
        f"{'scenario':9s} {'ranks':>5s} {'slots':>5s} {'all ops':>8s} {'own ops':>7s} "
        f"{'plan ms':>9s} {'plan MB':>8s} {'prepare ms':>10s} {'prepare MB':>10s} {'chunks':>6s}"
    )
    if args.vs_previous:
        header += f" {'prev plan ms':>12s} {'prev MB':>8s} {'speed-up':>8s}"
    print(header)
    for scenario in args.scenarios:
        for ranks in args.ranks:
            row = _sweep_row(args, scenario, ranks)
            rows.append(row)
            print(
                f"{scenario:9s} {ranks:5d} {row['slots']:5d} {row['ops']:8d} {row['own']:7d} "
                f"{row['plan_ms']:9.1f} {row['plan_mb']:8.1f} {row['prepare_ms']:10.1f} "
                f"{row['prepare_mb']:10.1f} {row['chunks']:6d}"
                + (
                    f" {row['prev_ms']:12.1f} {row['prev_mb']:8.1f} "
                    f"{row['prev_ms'] / row['plan_ms']:7.1f}x"
                    if args.vs_previous
                    else ""
                ),
                flush=True,
            )
    _print_growth(rows)
    if args.plot:
        _plot(rows)
    return 0


def _sweep_row(args: argparse.Namespace, scenario: str, ranks: int) -> dict[str, Any]:
    """One scenario at one size: the plan's cost, and the slowest sampled rank's preparation."""
    slots = max(1, -(-args.min_slots // ranks))
    rng = random.Random(ranks)
    previous, new, mapping = _sweep_placements(
        rng, scenario, args.layers, args.experts, ranks, slots
    )
    repeats = args.repeats if ranks <= 256 else max(1, args.repeats // 2)
    plan_s, plan_peak, plan = _measured(lambda: plan_transfers(previous, new, mapping), repeats)
    prev_s, prev_peak = 0.0, 0
    if args.vs_previous:
        with _previous_step_order():
            prev_s, prev_peak, _ = _measured(
                lambda: plan_transfers(previous, new, mapping), repeats
            )
    slots = max(previous.slots_per_rank, new.slots_per_rank)
    weights = [
        [torch.empty((slots, *shape), dtype=torch.bfloat16) for shape in V2_LITE_SHAPES]
        for _ in range(args.layers)
    ]
    worst = (0.0, 0, 0, 0)  # seconds, peak bytes, own ops, chunks
    for rank in sorted({0, ranks // 2, ranks - 1}):
        group = _HostOnlyGroup(rank, ranks)
        prep_s, prep_peak, prepared = _measured(
            lambda g=group: prepare_execution(
                plan, weights, g, buffer_bytes=args.buffer_mb << 20, copy="torch"
            ),
            repeats,
        )
        chunks = len(prepared._runner.chunks)
        if prep_s > worst[0]:
            worst = (prep_s, max(prep_peak, worst[1]), _own_ops(plan, rank), chunks)
    return {
        "scenario": scenario,
        "ranks": ranks,
        "slots": slots,
        "ops": len(plan.op_table.step) + len(plan.reloads),
        "own": worst[2],
        "plan_ms": 1e3 * plan_s,
        "plan_mb": plan_peak / 2**20,
        "prepare_ms": 1e3 * worst[0],
        "prepare_mb": worst[1] / 2**20,
        "chunks": worst[3],
        "prev_ms": 1e3 * prev_s,
        "prev_mb": prev_peak / 2**20,
    }


@contextlib.contextmanager
def _previous_step_order() -> Iterator[None]:
    """``plan_transfers`` orders its steps with the step order before 2026-12-03 meanwhile."""
    current = transfer_steps.interleave_steps
    transfer_steps.interleave_steps = step_order_previous.interleave_steps
    try:
        yield
    finally:
        transfer_steps.interleave_steps = current


def balance(args: argparse.Namespace) -> int:
    """How even the chunks load ranks and pairs, with the current and the previous step order
    and with whole layers in order, on the 4- and 2-rank V2-Lite reshuffles."""
    expert = sum(aligned(2 * rows * cols) for rows, cols in V2_LITE_SHAPES)
    print(
        "DeepSeek-V2-Lite reshuffle (26 layers x 64 experts, 80 slots), 2 GiB buffer, "
        "overlapped. busiest ranks: the sum over chunks of the busiest rank's experts (sent or "
        "received), over that rank's total; busiest pairs: the sum over chunks of the busiest "
        "pair's experts, against whole layers in order"
    )
    print(
        f"{'ranks':>5s} {'order':14s} {'steps':>6s} {'chunks':>6s} {'plan ms':>8s} "
        f"{'busiest ranks':>13s} {'busiest pairs':>13s} {'vs layers':>9s}"
    )
    for ranks in (4, 2):
        rng = random.Random(0)
        slots = math.ceil(80 / ranks)
        base = random_placement(rng, 26, 64, ranks, slots)
        new = random_placement(rng, 26, 64, ranks, slots)
        plans = {}
        for name in ("current", "previous"):
            with _previous_step_order() if name == "previous" else contextlib.nullcontext():
                plans[name] = _measured(functools.partial(plan_transfers, base, new), args.repeats)
        current = plans["current"][2]
        layered = dataclasses.replace(current, steps=tuple(sorted(current.steps, key=_layer)))
        plans["whole layers"] = (math.nan, 0, layered)
        layer_pairs = _chunk_loads(layered, ranks, expert)[2]
        for name, (seconds, _, plan) in plans.items():
            chunks, over, pairs = _chunk_loads(plan, ranks, expert)
            print(
                f"{ranks:5d} {name:14s} {len(plan.steps):6d} {chunks:6d} {1e3 * seconds:8.1f} "
                f"{100 * over:+12.1f}% {pairs:13d} {100 * (pairs / layer_pairs - 1):+8.1f}%"
            )
    return 0


def _layer(step: Step) -> int:
    return step.layer


def _chunk_loads(plan: TransferPlan, ranks: int, expert: int) -> tuple[int, float, int]:
    """(chunks; the sum over chunks of the busiest rank's experts over the busiest rank's total,
    minus 1; the sum over chunks of the busiest (sender, receiver) pair's experts)."""
    group_ranks = GroupRanks.new_numbering(plan.rank_mapping)
    chunks = cut_chunks(plan, [expert] * plan.new.num_layers, group_ranks, 2 << 30, True)
    busiest, pairs = 0, 0
    whole = np.zeros((2, ranks), dtype=np.int64)
    for chunk in chunks:
        load = np.zeros((2, ranks), dtype=np.int64)
        pair = np.zeros((ranks, ranks), dtype=np.int64)
        for step in chunk.steps:
            for op in step.ops:
                if isinstance(op, Transfer):
                    load[0, op.src] += 1
                    load[1, op.dst] += 1
                    pair[op.src, op.dst] += 1
        busiest += int(load.max())
        pairs += int(pair.max())
        whole += load
    return len(chunks), busiest / int(whole.max()) - 1, pairs


def _print_growth(rows: list[dict[str, Any]]) -> None:
    """Exponent ``k`` of ``cost ~ ranks^k`` between consecutive sizes (log-log slope)."""
    print("\ngrowth exponent between consecutive sizes (log-log slope; all ops is the global plan)")
    print(
        f"{'scenario':9s} {'ranks':>10s} {'all ops':>8s} {'plan ms':>8s} {'plan MB':>8s} "
        f"{'prep ms':>8s} {'prep MB':>8s}"
    )
    for a, b in itertools.pairwise(rows):
        if a["scenario"] != b["scenario"]:
            continue
        step = math.log(b["ranks"] / a["ranks"])
        slopes = [
            math.log(max(b[k], 1e-9) / max(a[k], 1e-9)) / step
            for k in ("ops", "plan_ms", "plan_mb", "prepare_ms", "prepare_mb")
        ]
        print(
            f"{a['scenario']:9s} {a['ranks']:4d}->{b['ranks']:<5d} "
            + " ".join(f"{s:8.2f}" for s in slopes)
        )


def _plot(rows: list[dict[str, Any]], width: int = 64, height: int = 20) -> None:
    """A log-log text plot of per-rank host ms (plan + prepare) against ranks, per scenario."""
    marks = "odx+*#"
    points = [
        (math.log2(r["ranks"]), math.log10(r["plan_ms"] + r["prepare_ms"]), r["scenario"])
        for r in rows
    ]
    scenarios = list(dict.fromkeys(s for _, _, s in points))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), math.floor(min(ys)), math.ceil(max(ys))
    grid = [[" "] * width for _ in range(height)]
    for x, y, s in points:
        col = round((x - x0) / max(x1 - x0, 1e-9) * (width - 1))
        line = height - 1 - round((y - y0) / max(y1 - y0, 1e-9) * (height - 1))
        grid[line][col] = marks[scenarios.index(s) % len(marks)]
    print(
        "\nper-rank host ms (plan_transfers + prepare_execution), log-log: "
        + ", ".join(f"{marks[i]} {s}" for i, s in enumerate(scenarios))
    )
    for i, line in enumerate(grid):
        y = y1 - i * (y1 - y0) / (height - 1)
        label = f"{10**y:8.1f} |" if i % 4 == 0 or i == height - 1 else "         |"
        print(label + "".join(line))
    print("         +" + "-" * width)
    ticks = [r for r in SWEEP_RANKS if x0 <= math.log2(r) <= x1]
    axis = [" "] * (width + 6)
    for r in ticks:
        col = round((math.log2(r) - x0) / max(x1 - x0, 1e-9) * (width - 1))
        for j, ch in enumerate(str(r)):
            axis[min(col + j, width + 5)] = ch
    print("          " + "".join(axis) + "  ranks")


if __name__ == "__main__":
    raise SystemExit(main())
