"""Benchmark elastic scale events end to end against floors measured in the same run.

DeepSeek-V2-Lite-sized experts by default: 26 MoE layers, 64 experts, bf16 ``w13`` [2*1408, 2048]
and ``w2`` [2048, 1408] per expert slot (17.3 MB), one process per GPU. On N devices the job
starts with N-1 ranks and runs, through the real ``ElasticCoordinator`` and ``ElasticRank``:

* ``scale N-1->N``, ``scale N->N-1``, ``scale N-1->N`` (drain mode; the ranks hold no requests);
* ``kill rank 1``: SIGKILL of a serving rank, the survivors recover (experts it alone held are
  reloaded through the hook).

Slots per rank: the fewest that give 4 ranks about 80 slots (V2-Lite's EPLB setting) and still
hold every expert on N-1 ranks (22 on 4 GPUs: 88 slots at 4 ranks, 66 at 3).

Per event: end to end (from the request, or the kill, to the coordinator seeing every rank serve
again), the blocking time (longest any rank could not step), each phase, and the expert weights
moved. Floors, measured first in the same run with raw torch on the same devices:

* group build: ``ProcessGroupNCCL`` on a ``PrefixStore`` plus a first all-reduce (cold = the
  first in the process, warm = the median of the later ones; an elastic scale builds warm);
* P2P bandwidth: a ring (each rank sends ``--raw-mb`` to its right neighbour, receives from its
  left); the transfer floor of an event is the busiest receiver's bytes at that bandwidth.

The serving loop of a bench rank polls and sleeps 1 ms (no NCCL forward), so how fast the
survivors of a kill notice is up to ``ElasticRank.poll``: only the dead rank's vote partners see
the broken connection at once; the others notice when the coordinator marks the member dead (the
poll checks those marks while it waits for its vote). ``--poll both`` runs the events with the
pipelined poll (the default: the vote posted at one poll, read at the next) and again with the
blocking one (the vote inside the poll), and compares them.

Usage::

    python benchmarks/bench_scaling.py --backend nccl --devices 4 [--json out.json] \
        [--markdown docs/performance.md]
    python benchmarks/bench_scaling.py --backend gloo --tiny      # CPU, tiny sizes (tests)
    python benchmarks/bench_scaling.py --backend gloo --tiny --poll both   # poll modes A/B
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from markdown_section import write_section
from ranks import run_ranks

from elastic_ep.eplb import Placement, plan
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling import (
    Action,
    ElasticCoordinator,
    ElasticRank,
    LocalProcessLauncher,
    RankRole,
    RankSpec,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.channel import put
from elastic_ep.scaling.poll import PollMode
from elastic_ep.scaling.status import EventKind

MARK = "<!-- bench_scaling -->"
TARGET_END_TO_END_S = 1.0
TARGET_BLOCKING_S = 0.5


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and settings every rank process gets (picklable)."""

    layers: int
    experts: int
    hidden: int
    intermediate: int
    slots: int
    dtype: str
    backend: str
    devices: int
    timeout_s: float
    transfer: str = "auto"  # ElasticRank's transfer_in_poll: auto (its default), poll, stream
    poll: str = "pipelined"  # ElasticRank's poll_mode (PollMode value)

    @property
    def expert_bytes(self) -> int:
        return (
            3 * self.hidden * self.intermediate * torch.finfo(getattr(torch, self.dtype)).bits // 8
        )

    def load(self) -> torch.Tensor:
        """float64 [L, E]: a fixed skewed load (lognormal(0, 0.6) per expert, seeded)."""
        gen = torch.Generator().manual_seed(0)
        return (
            torch.randn(self.layers, self.experts, generator=gen, dtype=torch.float64)
            .mul(0.6)
            .exp()
        )


@dataclass(frozen=True)
class RankSetup:
    config: BenchConfig
    device: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- floors: raw torch, one process per device ---------------------------------------------
def _raw_group(store: dist.Store, rank: int, size: int, backend: str) -> Any:
    timeout = timedelta(seconds=60)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, size, opts)


def _ring(pg: Any, send: torch.Tensor, recv: torch.Tensor, rank: int, size: int) -> None:
    right, left = (rank + 1) % size, (rank - 1) % size
    if send.device.type == "cuda":  # a raw ProcessGroupNCCL backend coalesces without a device
        pg._start_coalescing()
        pg.send([send], right, 0)
        pg.recv([recv], left, 0)
        pg._end_coalescing().wait()
    else:
        works = [pg.send([send], right, 0), pg.recv([recv], left, 0)]
        for work in works:
            work.wait()
    _sync(send.device)


def _floor_worker(
    rank: int, port: int, cfg: BenchConfig, raw_mb: int, reps: int
) -> dict[str, float] | None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cfg.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.ones(1, device=device)  # CUDA context outside the timed region
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=120))
    control = dist.ProcessGroupGloo(
        dist.PrefixStore("control", store), rank, cfg.devices, timedelta(seconds=120)
    )

    def slowest(seconds: float) -> float:
        t = torch.tensor([seconds], dtype=torch.float64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        control.allreduce([t], opts).wait()
        return float(t)

    builds = []
    for i in range(reps + 1):
        control.barrier().wait()
        start = time.perf_counter()
        pg = _raw_group(dist.PrefixStore(f"raw/{i}", store), rank, cfg.devices, cfg.backend)
        token = torch.ones(1, device=device)
        pg.allreduce([token]).wait()
        _sync(device)
        builds.append(slowest(time.perf_counter() - start))
        if i < reps:
            control.barrier().wait()
            pg.shutdown()
    count = (raw_mb << 20) // 2
    send = torch.ones(count, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    _ring(pg, send, recv, rank, cfg.devices)  # warm-up
    ring = []
    for _ in range(reps):
        control.barrier().wait()
        start = time.perf_counter()
        _ring(pg, send, recv, rank, cfg.devices)
        ring.append(slowest(time.perf_counter() - start))
    control.barrier().wait()
    pg.shutdown()
    control.barrier().wait()
    if rank != 0:
        return None
    return {
        "build_cold_s": builds[0],
        "build_warm_s": statistics.median(builds[1:]),
        "p2p_GBps": (raw_mb << 20) / statistics.median(ring) / 1e9,
    }


def measure_floors(cfg: BenchConfig, raw_mb: int, reps: int) -> dict[str, float]:
    floors: dict[str, float] = run_ranks(
        _floor_worker, cfg.devices, cfg, raw_mb, reps, timeout_s=300
    )[0]
    return floors


# ---- the elastic ranks --------------------------------------------------------------------------
def _fill(weights: list[list[torch.Tensor]], placement: Placement, rank: int) -> None:
    """Slot ``s`` of layer ``l`` holds the value of its expert id everywhere (checkable)."""
    local = placement.local_slots(rank)
    for layer, tensors in enumerate(weights):
        for slot, expert in enumerate(local[layer].tolist()):
            for t in tensors:
                t[slot].fill_(float(expert))


def _verify(weights: list[list[torch.Tensor]], placement: Placement, rank: int) -> str | None:
    local = placement.local_slots(rank)
    for layer, tensors in enumerate(weights):
        for kind, t in enumerate(tensors):
            held = t[: local.shape[1], 0, 0].float().cpu()
            want = local[layer].float()
            bad = (want >= 0) & (held != want)
            if bool(bad.any()):
                slot = int(bad.nonzero()[0])
                return f"layer {layer} kind {kind} slot {slot}: holds {float(held[slot])}, wants {float(want[slot])}"
    return None


def bench_rank(spec: RankSpec) -> None:
    setup: RankSetup = spec.config
    cfg = setup.config
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg.dtype)
    shapes = ((2 * cfg.intermediate, cfg.hidden), (cfg.hidden, cfg.intermediate))
    weights = [
        [torch.zeros((cfg.slots, *s), dtype=dtype, device=device) for s in shapes]
        for _ in range(cfg.layers)
    ]
    joiner = spec.role is RankRole.JOINER
    placement = None if joiner else plan(cfg.load(), len(spec.members), cfg.slots)
    if placement is not None:
        _fill(weights, placement, spec.rank)
    store = dist.TCPStore(
        spec.store_host,
        spec.store_port,
        is_master=False,
        timeout=timedelta(seconds=cfg.timeout_s),
        wait_for_workers=False,
    )

    def reload(layer: int, expert: int) -> list[torch.Tensor]:
        return [torch.full(s, float(expert), dtype=dtype, device=device) for s in shapes]

    try:
        agent = ElasticRank(
            spec,
            weights=weights,
            load=cfg.load,
            placement=placement,
            kv_bytes=lambda: 1 << 34,
            reload=reload,
            backend=cfg.backend,
            device=device,
            timeout_s=cfg.timeout_s,
            transfer_in_poll={"auto": None, "poll": True, "stream": False}[cfg.transfer],
            poll_mode=PollMode(cfg.poll),
        )
    except Exception:
        return  # a joiner of a rolled-back scale

    def report() -> None:
        execution = agent.last_execution
        info = {
            "error": _verify(weights, agent.placement, agent.rank),
            "rank": agent.rank,
            "phy2log": agent.placement.phy2log if agent.rank == 0 else None,
            "execute_s": execution.total_seconds if execution is not None else 0.0,
            "transfer_poll_s": agent.last_transfer_s,
        }
        put(store, f"bench/verify/{agent.epoch}/{agent.member}", pickle.dumps(info))

    report()
    while True:
        action = agent.poll()
        if action in (Action.LEAVE, Action.STOP):
            agent.close()
            return
        if action in (Action.COMMITTED, Action.RECOVERED):
            report()
        time.sleep(0.001)


# ---- the controller ---------------------------------------------------------------------------
class DeviceLauncher:
    """One process per device: each launch takes a device no live rank holds."""

    def __init__(self, cfg: BenchConfig) -> None:
        self._cfg = cfg
        self._launcher = LocalProcessLauncher(bench_rank)
        self._holders: dict[int, Any] = {}

    def launch(self, spec: RankSpec) -> Any:
        index = next(
            i
            for i in range(self._cfg.devices)
            if i not in self._holders or not self._holders[i].is_alive()
        )
        device = f"cuda:{index}" if self._cfg.backend == "nccl" else "cpu"
        handle = self._launcher.launch(
            RankSpec(
                spec.store_host,
                spec.store_port,
                spec.member_id,
                spec.epoch,
                spec.members,
                spec.role,
                RankSetup(self._cfg, device),
                spec.timeout_s,
            )
        )
        self._holders[index] = handle
        return handle


def _verified(
    coord: ElasticCoordinator, status: ScaleStatus, experts: int
) -> tuple[Placement, dict[str, float]]:
    """Every rank's self-check for the status's epoch (raises on a wrong slot); the placement,
    and the slowest rank's executor time and transfer poll of the epoch's event."""
    keys = [f"bench/verify/{status.epoch}/{m}" for m in status.members]
    coord.store.wait(keys, timedelta(seconds=120))
    infos = [pickle.loads(coord.store.get(k)) for k in keys]
    errors = [i["error"] for i in infos if i["error"]]
    if errors:
        raise AssertionError(f"wrong expert weights after epoch {status.epoch}: {errors[0]}")
    first = next(i for i in infos if i["rank"] == 0)
    slowest = {key: max(i[key] for i in infos) for key in ("execute_s", "transfer_poll_s")}
    return Placement(first["phy2log"], experts, len(status.members)), slowest


def _wait(coord: ElasticCoordinator, done: Any, limit_s: float) -> ScaleStatus:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = coord.status()
        if done(status):
            return status
        time.sleep(0.002)
    raise TimeoutError(f"event not done within {limit_s:g} s: {coord.status()}")


def run_events(cfg: BenchConfig, floors: dict[str, float]) -> list[dict[str, Any]]:
    n = cfg.devices
    limits = ScaleLimits(cfg.experts, cfg.slots, n * cfg.slots)
    coord = ElasticCoordinator(
        DeviceLauncher(cfg), limits, timeout_s=cfg.timeout_s, poll_interval_s=0.002
    )
    rows = []
    try:
        status = coord.start(n - 1, timeout_s=300)
        placement, _ = _verified(coord, status, cfg.experts)
        for kind, value in (("scale", n), ("scale", n - 1), ("scale", n), ("kill", 1)):
            before = status
            time.sleep(0.5)
            began = time.monotonic()
            if kind == "scale":
                label = f"scale {before.world_size}->{value}"
                coord.submit(ScaleRequest(world_size=value, timeout_s=120))
                status = _wait(coord, lambda s: not s.phase.is_active, 300)
            else:
                victim = before.members[value]
                label = f"kill rank {value} ({before.world_size}->{before.world_size - 1})"
                coord.handle(victim).kill()
                status = _wait(
                    coord,
                    lambda s, v=victim: (
                        s.event is EventKind.RECOVERY
                        and s.phase is ScalePhase.COMPLETED
                        and v not in s.members
                    ),
                    300,
                )
            end_to_end = time.monotonic() - began
            if status.phase is not ScalePhase.COMPLETED:
                raise RuntimeError(f"{label} did not complete: {status}")
            new, slowest = _verified(coord, status, cfg.experts)
            mapping = RankMapping.from_members(before.members, status.members)
            received = new.transfers_from(placement, mapping).sum(0)  # per new rank
            received_total = int(received.sum()) - status.lost_experts
            busiest = int(received.max()) * cfg.expert_bytes
            transfer_floor = busiest / (floors["p2p_GBps"] * 1e9)
            floor = floors["build_warm_s"] + transfer_floor
            rows.append(
                {
                    "event": label,
                    "end_to_end_s": end_to_end,
                    "blocking_s": status.blocking_s,
                    "phases_s": {p.value: s for p, s in status.phase_s},
                    "experts_moved": received_total,
                    "experts_reloaded": status.lost_experts,
                    "bytes_moved": received_total * cfg.expert_bytes,
                    "busiest_rank_bytes": busiest,
                    "transfer_floor_s": transfer_floor,
                    # a recovery runs no executor: what ranks report is the last scale's
                    "execute_s": slowest["execute_s"] if kind == "scale" else None,
                    "transfer_poll_s": slowest["transfer_poll_s"] if kind == "scale" else None,
                    "floor_s": floor,
                    "ratio_vs_floor": end_to_end / floor,
                }
            )
            placement = new
    finally:
        coord.shutdown(timeout_s=60)
    return rows


# ---- report -----------------------------------------------------------------------------------
def table(
    cfg: BenchConfig, floors: dict[str, float], rows: list[dict[str, Any]], device: str
) -> str:
    lines = [
        f"{device}; {cfg.layers} layers x {cfg.experts} experts, {cfg.slots} slots per rank, "
        f"expert {cfg.expert_bytes / 1e6:.1f} MB ({cfg.dtype}), backend {cfg.backend}, "
        f"transfer {cfg.transfer} (ElasticRank transfer_in_poll: auto = on for NCCL), "
        f"poll {cfg.poll}.",
        "",
        f"Floors (same run, raw torch): group build cold {floors['build_cold_s']:.3f} s, warm "
        f"{floors['build_warm_s']:.3f} s; ring P2P {floors['p2p_GBps']:.1f} GB/s per rank. Floor "
        "of an event = warm build + busiest receiver's bytes at the ring bandwidth.",
        "",
        "| event | end to end s | floor s | ratio | blocking s | phases s | execute ms | moved | busiest rank | transfer floor ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        phases = ", ".join(f"{p} {s:.3f}" for p, s in r["phases_s"].items())
        moved = f"{r['experts_moved']} ({r['bytes_moved'] / 1e9:.2f} GB)"
        execute = "" if r.get("execute_s") is None else f"{1e3 * r['execute_s']:.1f}"
        if r["experts_reloaded"]:
            moved += f" +{r['experts_reloaded']} reloaded"
        lines.append(
            f"| {r['event']} | {r['end_to_end_s']:.3f} | {r['floor_s']:.3f} | "
            f"{r['ratio_vs_floor']:.1f}x | {r['blocking_s']:.3f} | {phases} | {execute} | {moved} | "
            f"{r['busiest_rank_bytes'] / 1e9:.2f} GB | {1e3 * r['transfer_floor_s']:.1f} |"
        )
    e2e = max(r["end_to_end_s"] for r in rows)
    block = max(r["blocking_s"] for r in rows)
    lines += [
        "",
        f"Targets: end to end <= {TARGET_END_TO_END_S:g} s ({'met' if e2e <= TARGET_END_TO_END_S else 'NOT met'}: "
        f"worst {e2e:.3f} s), blocking <= {TARGET_BLOCKING_S:g} s "
        f"({'met' if block <= TARGET_BLOCKING_S else 'NOT met'}: worst {block:.3f} s).",
    ]
    return "\n".join(lines) + "\n"


def poll_comparison(pipelined: list[dict[str, Any]], blocking: list[dict[str, Any]]) -> str:
    """Per event: end to end and blocking time with each poll mode, and their ratio."""
    lines = [
        "| event | end to end s pipelined / blocking | ratio | blocking s pipelined / blocking | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for new, old in zip(pipelined, blocking, strict=True):
        e2e = (new["end_to_end_s"], old["end_to_end_s"])
        blk = (new["blocking_s"], old["blocking_s"])
        lines.append(
            f"| {new['event']} | {e2e[0]:.3f} / {e2e[1]:.3f} | {e2e[0] / e2e[1]:.2f} | "
            f"{blk[0]:.3f} / {blk[1]:.3f} | {blk[0] / blk[1]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def config_from(args: argparse.Namespace) -> BenchConfig:
    n = args.devices
    if n < 2:
        raise SystemExit("--devices must be >= 2 (scale N-1 <-> N and a kill)")
    if args.backend == "nccl" and torch.cuda.device_count() < n:
        raise SystemExit(f"--devices {n}: only {torch.cuda.device_count()} CUDA devices visible")
    layers, experts, hidden, inter = (2, 8, 64, 32) if args.tiny else (26, 64, 2048, 1408)
    slots = args.slots or max(math.ceil(80 * experts / 64 / 4), math.ceil(experts / (n - 1)))
    dtype = "float32" if args.backend == "gloo" else "bfloat16"
    return BenchConfig(
        layers, experts, hidden, inter, slots, dtype, args.backend, n, args.timeout_s, args.transfer
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    parser.add_argument("--devices", type=int, default=4, help="processes (one per GPU)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (2 layers, 8 experts)")
    parser.add_argument("--slots", type=int, help="expert slots per rank")
    parser.add_argument("--raw-mb", type=int, help="ring message size (default 256, tiny 4)")
    parser.add_argument("--reps", type=int, default=5, help="floor repetitions")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="group timeout")
    parser.add_argument(
        "--transfer",
        choices=("auto", "poll", "stream"),
        default="auto",
        help="where a scale's transfer runs: at a lockstep poll (blocking), on the staging "
        "thread's own CUDA stream (overlapped), or the library's default (poll on NCCL)",
    )
    parser.add_argument(
        "--poll",
        choices=("pipelined", "blocking", "both"),
        default="pipelined",
        help="ElasticRank's poll mode; both: the events run again with the blocking poll, in "
        "the same run, and a table compares the two",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument(
        "--markdown",
        type=Path,
        help=f"write the table into this file's {MARK} section (e.g. docs/performance.md)",
    )
    args = parser.parse_args(argv)
    cfg = replace(config_from(args), poll="pipelined" if args.poll == "both" else args.poll)
    raw_mb = args.raw_mb or (4 if args.tiny else 256)
    device = (
        torch.cuda.get_device_name(0) + f" x{cfg.devices}"
        if cfg.backend == "nccl"
        else f"CPU x{cfg.devices} processes"
    )
    print(f"floors on {device} ...", flush=True)
    floors = measure_floors(cfg, raw_mb, args.reps)
    print(f"  {floors}", flush=True)
    print("elastic events ...", flush=True)
    rows = run_events(cfg, floors)
    body = table(cfg, floors, rows, device)
    result = {"device": device, "config": asdict(cfg), "floors": floors, "events": rows}
    if args.poll == "both":
        print("elastic events, blocking poll ...", flush=True)
        blocking = run_events(replace(cfg, poll="blocking"), floors)
        result["events_blocking_poll"] = blocking
        body += "\n" + poll_comparison(rows, blocking)
    print(body)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    if args.markdown:
        write_section(args.markdown, MARK, body)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
