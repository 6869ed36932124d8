"""Planner benchmark: elastic_ep's planner side by side with vLLM's DefaultEplbPolicy.

Both run in this process on 1 thread, on the same seeded loads. vLLM's policy module is imported
from an installed vllm, or read from its wheel without installing it:

    pip download vllm==0.33.0 --no-deps -d .carry/wheels
    python benchmarks/bench_planner.py [--vllm-wheel PATH] [--json out.json] \
        [--markdown docs/performance.md]
    python benchmarks/bench_planner.py --sweep [--plot docs/img/planner_sweep.png] \
        [--json sweep.json] [--markdown docs/planner.md] [--ranks 8,64,1024] [--failing]
    python benchmarks/bench_planner.py --sweep --from-json a.json b.json --failing
    python benchmarks/bench_planner.py --sweep --rerun a.json b.json --json again.json

``--sweep`` runs the growth grid of :mod:`planner_sweep` (ranks 8..1024, slots per rank,
four models, global and hierarchical, fresh / drift / scale / dead) instead of the cases below;
``--failing`` lists the cells short of each target, ``--rerun`` runs only the cells of saved
sweeps that were.

Cases: V3 (58 layers x 256 experts, 8 groups, 4 nodes, 32 ranks, 288 and 320 slots,
hierarchical and global) and V2-Lite (26 x 64, 8 ranks, 80 slots); loads lognormal(0, 0.6) and
permuted Zipf(1). Per case: time and balancedness of both; a 10% drift (loads x
lognormal(0, 0.1), each planner given its own previous placement), and scale events
with slots per rank constant (V3-320 32->36 and 32->28, V2-Lite 8->9 and 8->7): weights
received (% of the new slots) and balancedness. ``--markdown`` rewrites the planner section of
that file (between ``<!-- bench_planner -->`` markers) and keeps the rest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from markdown_section import write_section
from planner_sweep import (
    MODELS,
    RANKS,
    SweepRow,
    cells,
    failing,
    failing_report,
    plot,
    repeats_for,
    run_cell,
    summary,
    sweep_table,
)

from elastic_ep import RankMapping
from elastic_ep.adapters.vllm import load_policy_modules
from elastic_ep.eplb import Placement, plan, plan_with_report


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    experts: int
    ranks: int
    slots: int
    groups: int
    nodes: int


SHAPES = [
    Shape("V3-288 hier", 58, 256, 32, 9, 8, 4),
    Shape("V3-288 global", 58, 256, 32, 9, 1, 1),
    Shape("V3-320 hier", 58, 256, 32, 10, 8, 4),
    Shape("V3-320 global", 58, 256, 32, 10, 1, 1),
    Shape("V2-Lite-80", 26, 64, 8, 10, 1, 1),
]
SCALE_EVENTS = {"V3-320 global": (36, 28), "V2-Lite-80": (9, 7)}
SEED = 0


def make_load(kind: str, layers: int, experts: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "logn":
        return rng.lognormal(0.0, 0.6, (layers, experts))
    zipf = 1.0 / np.arange(1, experts + 1)
    return np.stack([rng.permutation(zipf) for _ in range(layers)]) * 1000.0


def side_by_side(
    ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int
) -> tuple[float, Any, float, Any]:
    """Median ms and last result of each, the two runs alternating so that both see the same
    background load."""
    times: tuple[list[float], list[float]] = ([], [])
    results: list[Any] = [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    ms = [1e3 * statistics.median(t) for t in times]
    return ms[0], results[0], ms[1], results[1]


@dataclass
class Row:
    case: str
    load: str
    event: str
    ours_ms: float
    vllm_ms: float
    ours_balance: float
    vllm_balance: float
    ours_moved_pct: float | None = None
    vllm_moved_pct: float | None = None
    minimum_moved_pct: float | None = None
    keep_balance: float | None = None


def run(vllm_policy: Any, repeats: int) -> list[Row]:
    rows = []
    for shape in SHAPES:
        for kind in ("logn", "zipf"):
            load = make_load(kind, shape.layers, shape.experts)
            weight = torch.from_numpy(load)
            slots = shape.ranks * shape.slots

            def ours(load: Any = load, shape: Shape = shape) -> Placement:
                return plan(
                    load, shape.ranks, shape.slots, num_groups=shape.groups, num_nodes=shape.nodes
                )

            def theirs(
                weight: torch.Tensor = weight, shape: Shape = shape, slots: int = slots
            ) -> Placement:
                phy2log = vllm_policy.rebalance_experts(
                    weight, slots, shape.groups, shape.nodes, shape.ranks
                )
                return Placement(phy2log.to(torch.int64), shape.experts, shape.ranks)

            ours_ms, mine, vllm_ms, base = side_by_side(ours, theirs, repeats)
            mine.validate(distinct_ranks=True)
            rows.append(
                Row(
                    shape.name,
                    kind,
                    "static",
                    ours_ms,
                    vllm_ms,
                    mine.balancedness(weight),
                    base.balancedness(weight),
                )
            )
            rows.append(drift_row(vllm_policy, shape, kind, load, mine, base, repeats))
            for new_ranks in SCALE_EVENTS.get(shape.name, ()):
                rows.append(
                    scale_row(vllm_policy, shape, kind, load, mine, base, new_ranks, repeats)
                )
    return rows


def drift_row(
    vllm_policy: Any,
    shape: Shape,
    kind: str,
    load: np.ndarray,
    mine: Placement,
    base: Placement,
    repeats: int,
) -> Row:
    drifted = load * np.random.default_rng(SEED + 1).lognormal(0.0, 0.1, load.shape)
    weight = torch.from_numpy(drifted)
    slots = shape.ranks * shape.slots
    groups, nodes = shape.groups, shape.nodes
    ours_ms, report, vllm_ms, phy2log = side_by_side(
        lambda: plan_with_report(
            drifted, shape.ranks, shape.slots, num_groups=groups, num_nodes=nodes, previous=mine
        ),
        lambda: vllm_policy.rebalance_experts(
            weight, slots, groups, nodes, shape.ranks, base.phy2log
        ),
        repeats,
    )
    theirs = Placement(phy2log.to(torch.int64), shape.experts, shape.ranks)
    total = shape.layers * slots
    return Row(
        shape.name,
        kind,
        "drift 10%",
        ours_ms,
        vllm_ms,
        report.placement.balancedness(weight),
        theirs.balancedness(weight),
        100.0 * float(report.transfers.sum()) / total,
        100.0 * float(theirs.transfers_from(base).sum()) / total,
        0.0,
        mine.balancedness(weight),
    )


def scale_row(
    vllm_policy: Any,
    shape: Shape,
    kind: str,
    load: np.ndarray,
    mine: Placement,
    base: Placement,
    new_ranks: int,
    repeats: int,
) -> Row:
    weight = torch.from_numpy(load)
    mapping = RankMapping.resize(shape.ranks, new_ranks)
    slots = new_ranks * shape.slots
    # vLLM's slot-preserving step needs equal shapes; for a scale event it plans from scratch.
    ours_ms, report, vllm_ms, phy2log = side_by_side(
        lambda: plan_with_report(load, new_ranks, shape.slots, previous=mine, rank_mapping=mapping),
        lambda: vllm_policy.rebalance_experts(weight, slots, 1, 1, new_ranks),
        repeats,
    )
    theirs = Placement(phy2log.to(torch.int64), shape.experts, new_ranks)
    total = shape.layers * slots
    return Row(
        shape.name,
        kind,
        f"scale {shape.ranks}->{new_ranks}",
        ours_ms,
        vllm_ms,
        report.placement.balancedness(weight),
        theirs.balancedness(weight),
        100.0 * float(report.transfers.sum()) / total,
        100.0 * float(theirs.transfers_from(base, mapping).sum()) / total,
        100.0 * minimum_moves(mine, mapping, shape.slots) / total,
    )


def minimum_moves(previous: Placement, mapping: RankMapping, slots_per_rank: int) -> int:
    """Fewest weights any full placement must receive: fill every joined rank's slots, and
    re-home every expert with no replica left on a surviving rank."""
    survivors = [old for old in range(previous.num_ranks) if mapping.new_rank(old) is not None]
    orphaned = int((~previous.presence[:, survivors].any(1)).sum())
    return orphaned + previous.num_layers * len(mapping.joined) * slots_per_rank


def table(rows: list[Row]) -> str:
    head = (
        "| case | load | event | ours ms | vLLM ms | speed-up | ours bal. | vLLM bal. "
        "| ours moved | vLLM moved | min. moved | keep bal. |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )

    def pct(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}%"

    lines = [
        f"| {r.case} | {r.load} | {r.event} | {r.ours_ms:.2f} | {r.vllm_ms:.1f} | "
        f"{r.vllm_ms / r.ours_ms:.1f}x | {r.ours_balance:.4f} | {r.vllm_balance:.4f} | "
        f"{pct(r.ours_moved_pct)} | {pct(r.vllm_moved_pct)} | {pct(r.minimum_moved_pct)} | "
        f"{'' if r.keep_balance is None else f'{r.keep_balance:.4f}'} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


MARK = "<!-- bench_planner -->"
SWEEP_MARK = "<!-- bench_planner_sweep -->"


def machine_line() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}"
    )


def run_sweep(vllm_policy: Any, version: str, args: argparse.Namespace) -> None:
    ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
    experts = tuple(int(e) for e in args.experts.split(",")) if args.experts else tuple(MODELS)
    rows: list[SweepRow] = []
    todo = list(cells(ranks, experts))
    if args.rerun:
        short = {
            (r.experts, r.ranks, r.slots, r.policy)
            for part in failing(_saved_rows(args.rerun)).values()
            for r in part
        }
        todo = [c for c in todo if (c.experts, c.ranks, c.slots, c.policy) in short]
    run_cell(next(cells((8,))), vllm_policy, 1)  # warm-up: first-call imports and caches
    start = time.perf_counter()
    for cell in todo:
        done = run_cell(cell, vllm_policy, repeats_for(cell))
        rows.extend(done)
        worst = min(r.speedup for r in done[1:])
        print(
            f"{cell.experts:3d} x {cell.layers:2d}  {cell.ranks:4d} x {cell.slots}  "
            f"{cell.policy:6s} fresh {done[0].speedup:5.1f}x, movement-aware >= {worst:4.1f}x  "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        if args.json:  # after every cell, so that an interrupted sweep keeps its rows
            _write_sweep_json(args.json, version, rows, time.perf_counter() - start)
    report_sweep(rows, version, machine_line(), (time.perf_counter() - start) / 60, args)


def _write_sweep_json(path: Path, version: str, rows: list[SweepRow], seconds: float) -> None:
    path.write_text(
        json.dumps(
            {
                "vllm_version": version,
                "machine": machine_line(),
                "date": datetime.date.today().isoformat(),
                "seconds": seconds,
                "rows": [asdict(r) for r in rows],
            },
            indent=1,
        )
    )


def report_sweep(
    rows: list[SweepRow],
    version: str,
    machine: str,
    minutes: float,
    args: argparse.Namespace,
    day: str | None = None,
) -> None:
    """Print the summary; write the plot and the markdown section where asked (``day``: the
    date of the run, today if ``None``)."""
    head = (
        f"`python benchmarks/bench_planner.py --sweep` on "
        f"{day or datetime.date.today().isoformat()} ({machine}; 1 thread; "
        f"{minutes:.1f} min in all; vLLM {version} DefaultEplbPolicy in the same run, each "
        f"planner's calls in a row after an untimed one, CPU time of each call; seed {SEED}). "
        f"Speed-up = vLLM ms / ours ms; moved = weights received, % of the new slots; min. = "
        f"per layer the experts with no surviving replica or the joined slots, whichever is "
        f"more.\n\n"
    )
    print(summary(rows))
    if args.failing:
        print(failing_report(rows))
    if args.plot:
        plot(rows, args.plot)
    if args.markdown:
        body = (
            head
            + summary(rows)
            + "\n<details><summary>All cells</summary>\n\n"
            + sweep_table(rows)
            + "\n</details>\n"
        )
        write_section(args.markdown, SWEEP_MARK, body)


def _saved_rows(paths: list[Path]) -> list[SweepRow]:
    """The rows of saved sweeps (``--json``), merged: the first file wins a cell."""
    rows, seen = [], set()
    for path in paths:
        for row in map(lambda r: SweepRow(**r), json.loads(path.read_text())["rows"]):
            key = (row.experts, row.ranks, row.slots, row.policy, row.event)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    rows.sort(key=lambda r: (r.experts, r.ranks, r.slots, r.policy != "global"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-wheel", type=Path, help="vLLM wheel to read the policy from")
    parser.add_argument("--repeats", type=int, default=7, help="runs per timing (median)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="rewrite the planner section of this file")
    parser.add_argument("--sweep", action="store_true", help="the growth grid (planner_sweep.py)")
    parser.add_argument("--plot", type=Path, help="with --sweep: time vs ranks, log-log (PNG)")
    parser.add_argument("--ranks", help="with --sweep: comma-separated subset of the rank counts")
    parser.add_argument("--experts", help="with --sweep: comma-separated subset of 64,128,256,384")
    parser.add_argument(
        "--failing",
        action="store_true",
        help="with --sweep: list the cells short of each target (planner_sweep.TARGETS)",
    )
    parser.add_argument(
        "--rerun",
        type=Path,
        nargs="+",
        help="with --sweep: run only the cells with a row short of a target in these saved sweeps",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="with --sweep: report saved sweeps (--json) again, merged (first file wins a cell)",
    )
    args = parser.parse_args()
    if args.sweep and args.from_json:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        minutes = sum(part["seconds"] for part in saved) / 60
        rows = _saved_rows(args.from_json)
        report_sweep(
            rows,
            saved[0]["vllm_version"],
            saved[0]["machine"],
            minutes,
            args,
            saved[0].get("date"),
        )
        return
    torch.set_num_threads(1)
    wheel = args.vllm_wheel
    if wheel is None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            found = sorted(Path(".carry/wheels").glob("vllm-*.whl"))
            if not found:
                raise SystemExit(
                    "no vllm installed and no wheel: pip download vllm==0.33.0 --no-deps -d .carry/wheels"
                ) from None
            wheel = found[-1]
    _, default, version = load_policy_modules(wheel)
    source = "installed package" if wheel is None else wheel.name
    print(f"vLLM {version} DefaultEplbPolicy from {source}; torch threads = 1")
    if args.sweep:
        run_sweep(default.DefaultEplbPolicy, version, args)
        return
    rows = run(default.DefaultEplbPolicy, args.repeats)
    machine = machine_line()
    body = (
        f"### Planner vs vLLM {version} DefaultEplbPolicy\n\n"
        f"`python benchmarks/bench_planner.py` on {datetime.date.today().isoformat()} ({machine}; "
        f"1 thread; median of {args.repeats} "
        f"runs, ours and vLLM's alternating; "
        f"seed {SEED}). Moved = weights received, % of the new slots; min. = fill joined ranks "
        f"and re-home experts with no surviving replica; keep bal. = previous placement under the "
        f"drifted load.\n\n" + table(rows)
    )
    print(table(rows))
    if args.json:
        args.json.write_text(
            json.dumps({"vllm_version": version, "rows": [asdict(r) for r in rows]}, indent=1)
        )
    if args.markdown:
        write_section(args.markdown, MARK, body)


if __name__ == "__main__":
    main()
