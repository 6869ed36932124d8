"""The control plane's cost against the number of ranks: the per-step poll, and a scale event's
control time and TCPStore operations, for the blocking poll and the pipelined one side by side.

For each world size R, two jobs run one after the other through the real ``ElasticCoordinator``
and ``ElasticRank`` (tiny experts, gloo on CPU), one with ``PollMode.BLOCKING`` (the vote inside
every poll) and one with ``PollMode.PIPELINED`` (posted at one poll, read at the next). A rank's
serving loop: ``poll()`` (timed on the serving thread), then a "forward" of one all-reduce on the
world group and a sleep of ``--step-ms``. Each job serves quietly for ``--quiet-s`` (poll cost,
store operations per step), then runs a rebalance at R ranks and a scale-down R -> R-1 (no
process launch, so the time is the control plane's: votes, group builds, reports; the weights
are a few KB).

TCPStore operations are counted in every process (ranks and coordinator) by a counting wrapper
around the store client (the ``rendezvous`` module's ``TCPStore`` replaced in each process), by
the kind of key: serving operations (the leader's look for a new command, death-counter reads,
the coordinator's monitor) per step of the quiet window, an event's operations (group builds,
the command, reports) in its window. Before the first job of each R
the ranks also time the two vote algorithms alone on the control group: gloo's ring all-reduce
(the blocking poll's) and the dissemination MAX (the pipelined poll's), for the per-hop model in
docs/scaling.md.

    python benchmarks/bench_control.py --ranks 2 4 8 16 --json control.json
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from elastic_ep.eplb import plan
from elastic_ep.scaling import (
    Action,
    ElasticCoordinator,
    ElasticRank,
    LocalProcessLauncher,
    RankRole,
    RankSpec,
    RebalanceRequest,
    ScaleLimits,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.poll import NUM_FLAGS, PollMode, dissemination_max
from elastic_ep.testing.counting_store import StoreCounts, count_rendezvous_stores

LAYERS, EXPERTS, SLOTS = 1, 4, 2
SHAPE = (4,)  # one tiny tensor per expert slot


PER_STEP = ("seq", "dead", "monitor")
"""Kinds of store operations made while serving (per step or per wait), not by an event."""


def kind_of(key: str) -> str:
    """What a store operation is for, from its key: ``seq`` (the leader's look for a new
    command), ``dead`` (death marks), ``monitor`` (the coordinator's look for recoveries),
    ``group`` (group builds), ``report`` / ``command`` (the event's messages), ``other``."""
    if key.startswith("group/"):
        return "group"
    if key == "ctl/seq":
        return "seq"
    if key.startswith("ctl/dead"):
        return "dead"
    if key.startswith("ctl/recovery"):
        return "monitor"
    if key.startswith("ctl/report"):
        return "report"
    if key.startswith("ctl/"):
        return "command"
    return "other"


COUNTS = StoreCounts(kind_of)


def event_ops() -> int:
    return sum(n for k, n in COUNTS.calls.items() if k not in PER_STEP)


def step_ops() -> int:
    return sum(n for k, n in COUNTS.calls.items() if k in PER_STEP)


def count_store_operations() -> None:
    """Make every ``Rendezvous`` of this process build counting store clients."""
    count_rendezvous_stores(COUNTS)


@dataclass(frozen=True)
class Config:
    mode: str
    data_port: int
    step_s: float
    timeout_s: float
    vote_reps: int  # > 0: time the two vote algorithms first


# ---- a rank ----------------------------------------------------------------------------------
def _time_votes(agent: ElasticRank, reps: int) -> dict[str, float]:
    """Median seconds of gloo's ring all-reduce and of the dissemination MAX on the control
    group (after a barrier each, slowest rank)."""
    group = agent.control
    pg = group.process_group
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    out: dict[str, list[float]] = {"ring": [], "dissemination": []}
    for _ in range(reps):
        for name in out:
            pg.barrier().wait()
            flags = torch.zeros(NUM_FLAGS, dtype=torch.int64)
            start = time.perf_counter()
            if name == "ring":
                pg.allreduce([flags], opts).wait()
            else:
                dissemination_max(pg, group.rank, group.world_size, flags, lambda w: w.wait())
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            pg.allreduce([took], opts).wait()
            out[name].append(float(took))
    return {name: statistics.median(v) for name, v in out.items()}


def bench_rank(spec: RankSpec) -> None:
    cfg: Config = spec.config
    count_store_operations()
    data = dist.TCPStore("127.0.0.1", cfg.data_port, is_master=False, wait_for_workers=False)
    joiner = spec.role is RankRole.JOINER
    placement = None if joiner else plan(torch.ones(LAYERS, EXPERTS), len(spec.members), SLOTS)
    weights = [[torch.zeros(SLOTS, *SHAPE)] for _ in range(LAYERS)]
    agent = ElasticRank(
        spec,
        weights=weights,
        load=lambda: torch.ones(LAYERS, EXPERTS),
        placement=placement,
        kv_bytes=lambda: 1 << 30,
        timeout_s=cfg.timeout_s,
        poll_mode=PollMode(cfg.mode),
    )
    if cfg.vote_reps:
        votes = _time_votes(agent, cfg.vote_reps)
        if agent.rank == 0:
            data.set("votes", pickle.dumps(votes))
    data.set(f"ready/{spec.member_id}", b"1")
    # (monotonic, poll seconds, action, event store ops, serving store ops, group-build ops,
    # keys those named)
    log: list[tuple[float, float, str, int, int, int, int]] = []
    token = torch.ones(1)
    try:
        while True:
            start = time.perf_counter()
            action = agent.poll()
            took = time.perf_counter() - start
            entry = (
                time.monotonic(),
                took,
                action.value,
                event_ops(),
                step_ops(),
                COUNTS.calls["group"],
                COUNTS.keys["group"],
            )
            log.append(entry)
            if action in (Action.LEAVE, Action.STOP):
                return
            world = agent.world
            agent.wait(world.process_group.allreduce([token]), world)  # the engine's collective
            time.sleep(cfg.step_s)
    finally:
        data.set(f"log/{spec.member_id}", pickle.dumps((log, dict(COUNTS.calls))))
        agent.close()


# ---- the controller -------------------------------------------------------------------------
def _wait_done(coord: ElasticCoordinator, limit_s: float) -> ScaleStatus:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = coord.status()
        if not status.phase.is_active:
            return status
        time.sleep(0.002)
    raise TimeoutError(f"event not done within {limit_s:g} s: {coord.status()}")


def _ops_in(logs: dict[int, list[Any]], t0: float, t1: float, column: int) -> int:
    """Store operations the ranks made in [t0, t1] (from each rank's per-step counters)."""
    total = 0
    for log in logs.values():
        inside = [e[column] for e in log if t0 <= e[0] <= t1]
        before = [e[column] for e in log if e[0] < t0]
        if inside:
            total += inside[-1] - (before[-1] if before else inside[0])
    return total


def run_job(ranks: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    data = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cfg = Config(mode, data.port, args.step_ms / 1e3, args.timeout_s, args.vote_reps)
    limits = ScaleLimits(EXPERTS, SLOTS, max(ranks, 2) * SLOTS)
    COUNTS.clear()
    coord = ElasticCoordinator(
        LocalProcessLauncher(bench_rank), limits, config=cfg, timeout_s=args.timeout_s
    )
    windows: dict[str, tuple[float, float]] = {}
    events: dict[str, dict[str, Any]] = {}
    coord_ops: dict[str, int] = {}
    try:
        coord.start(ranks, timeout_s=600)
        data.wait([f"ready/{m}" for m in range(ranks)], timedelta(seconds=600))
        time.sleep(1.0)  # every rank in its loop
        t0, c0 = time.monotonic(), step_ops()
        time.sleep(args.quiet_s)
        windows["quiet"] = (t0, time.monotonic())
        coord_ops["quiet"] = step_ops() - c0
        todo: list[tuple[str, Any]] = [("rebalance", RebalanceRequest(timeout_s=120))]
        if ranks > 2:
            todo.append((f"scale {ranks}->{ranks - 1}", ScaleRequest(world_size=ranks - 1)))
        for label, request in todo:
            c0 = event_ops()
            began = time.monotonic()
            coord.submit(request)
            status = _wait_done(coord, 300)
            windows[label] = (began, time.monotonic())
            coord_ops[label] = event_ops() - c0
            if status.phase.value != "completed":
                raise RuntimeError(f"{label} at {ranks} ranks ({mode}): {status}")
            events[label] = {
                "control_s": windows[label][1] - began,
                "blocking_s": status.blocking_s,
                "phases_s": {p.value: s for p, s in status.phase_s},
            }
            time.sleep(0.5)
    finally:
        coord.shutdown(timeout_s=120)
    logs = {}
    rank_kinds: collections.Counter[str] = collections.Counter()
    for m in range(ranks):
        log, kinds = pickle.loads(data.get(f"log/{m}"))
        logs[m] = log
        rank_kinds.update(kinds)
    q0, q1 = windows["quiet"]
    polls = [e[1] for log in logs.values() for e in log if q0 <= e[0] <= q1]
    steps = sum(1 for log in logs.values() for e in log if q0 <= e[0] <= q1)
    quiet_ops = _ops_in(logs, q0, q1, 4)
    for label, ev in events.items():
        t0, t1 = windows[label]
        rank_ops = _ops_in(logs, t0, t1 + 1.0, 3)  # a rank logs at its next poll
        ev["store_ops_ranks"] = rank_ops
        ev["store_ops_coordinator"] = coord_ops[label]
        ev["store_ops"] = rank_ops + coord_ops[label]
        ev["store_ops_group_builds"] = _ops_in(logs, t0, t1 + 1.0, 5)
        ev["store_keys_group_builds"] = _ops_in(logs, t0, t1 + 1.0, 6)
    result: dict[str, Any] = {
        "ranks": ranks,
        "mode": mode,
        "poll_median_us": 1e6 * statistics.median(polls),
        "poll_p99_us": 1e6 * statistics.quantiles(polls, n=100)[98],
        # while serving: per step, all processes together (leader's command look, death-counter
        # reads of ranks waiting longer than DEAD_CHECK_S, the coordinator's monitor)
        "store_ops_per_step": (quiet_ops + coord_ops["quiet"]) / max(1, steps / ranks),
        "store_ops_per_step_ranks": quiet_ops / max(1, steps / ranks),
        "job_store_ops_by_kind": {"ranks": dict(rank_kinds), "coordinator": dict(COUNTS.calls)},
        "events": events,
    }
    if args.vote_reps and data.check(["votes"]):
        result["votes_us"] = {k: 1e6 * v for k, v in pickle.loads(data.get("votes")).items()}
    return result


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| ranks | poll | poll median us | poll p99 us | store ops/step | "
        "rebalance ms | ops (groups) | scale-down ms | ops (groups) | ring vote us | "
        "dissemination us |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ev = r["events"]
        down = next((v for k, v in ev.items() if k.startswith("scale")), None)
        votes = r.get("votes_us", {})
        lines.append(
            f"| {r['ranks']} | {r['mode']} | {r['poll_median_us']:.0f} | {r['poll_p99_us']:.0f} | "
            f"{r['store_ops_per_step']:.2f} | {1e3 * ev['rebalance']['control_s']:.0f} | "
            f"{ev['rebalance']['store_ops']} ({ev['rebalance']['store_ops_group_builds']}) | "
            + (
                f"{1e3 * down['control_s']:.0f} | {down['store_ops']} "
                f"({down['store_ops_group_builds']}) | "
                if down
                else "| | "
            )
            + f"{votes.get('ring', float('nan')):.0f} | {votes.get('dissemination', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--modes", nargs="+", default=[m.value for m in PollMode])
    parser.add_argument("--step-ms", type=float, default=20.0, help="sleep per forward step")
    parser.add_argument("--quiet-s", type=float, default=3.0, help="serving with no event")
    parser.add_argument("--vote-reps", type=int, default=30, help="timed votes of each kind")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="group timeout")
    parser.add_argument("--json", type=Path, help="append the rows to this JSON file")
    args = parser.parse_args(argv)
    count_store_operations()
    rows = []
    for ranks in args.ranks:
        for i, mode in enumerate(args.modes):
            reps = args.vote_reps if i == 0 else 0
            row = run_job(ranks, mode, argparse.Namespace(**{**vars(args), "vote_reps": reps}))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                previous = json.loads(args.json.read_text()) if args.json.exists() else []
                args.json.write_text(json.dumps([*previous, row], indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
