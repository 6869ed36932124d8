"""End-to-end scaling with real rank processes over gloo, driven by the real coordinator.

A tiny elastic "engine" runs in each rank process.

Expert weights are built from (layer, expert, kind), so every rank can check bit for bit that
each of its slots holds its expert after every event (scale, rebalance, recovery). Each rank
reports what it saw to the job's store under ``test/verify/<epoch>/<member>``. The engine's
load is ``load_of(cfg)`` until the test writes another one to ``test/load`` (JSON [L, E]), so a
rebalance has something to move.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
from torch.distributed import ReduceOp, TCPStore

from elastic_ep.eplb import Placement
from elastic_ep.eplb.planner import plan
from elastic_ep.errors import PeerFailure, ReconfigureError, ScalingInProgress
from elastic_ep.groups import GroupClosedError
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling import (
    Action,
    ControlServer,
    ElasticCoordinator,
    ElasticRank,
    EpochResources,
    GateMode,
    LocalProcessLauncher,
    RankRole,
    RankSpec,
    RebalanceRequest,
    ScaleConflict,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
    TrafficGate,
)
from elastic_ep.scaling.channel import put
from elastic_ep.scaling.status import EventKind
from elastic_ep.testing.toy_engine import KINDS, expert_weight, slot_weights, wrong_weight


@dataclass(frozen=True)
class EngineConfig:
    layers: int
    experts: int
    slots: int
    skew: float = 1.0  # load of expert e is skew ** e (1.0 = uniform)
    kill_joiners_in_build: frozenset[int] = field(default_factory=frozenset)
    exit_joiners: frozenset[int] = field(default_factory=frozenset)  # return before connecting
    hang_joiners: frozenset[int] = field(default_factory=frozenset)  # never connect
    fail_plan_once_at: int | None = None  # the planner raises once for this world size
    fail_rebalance_once: bool = False  # the planner raises for the first rebalance
    kill_at_kv: frozenset[int] = field(default_factory=frozenset)  # SIGKILL when asked for KV bytes
    backend: str = "gloo"  # "nccl": one GPU per rank, GPU = member id % device count
    transfer_in_poll: bool | None = None  # ElasticRank's default: on for NCCL only


def load_of(cfg: EngineConfig) -> torch.Tensor:
    per_expert = torch.tensor([cfg.skew**e for e in range(cfg.experts)], dtype=torch.float64)
    return per_expert.expand(cfg.layers, -1).clone()


def _device(cfg: EngineConfig, member: int) -> torch.device:
    if cfg.backend == "gloo":
        return torch.device("cpu")
    device = torch.device("cuda", member % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def _sole_replicas(agent: ElasticRank) -> int:
    """(layer, expert) pairs whose only replica is on this rank."""
    return int(agent.placement.lost_with([agent.rank]).sum())


def _publish(agent: ElasticRank, event: str, builds: list[int]) -> None:
    info = {
        "event": event,
        "error": wrong_weight(agent),
        "kv": agent.kv_budget_bytes,
        "world": agent.world_size,
        "rank": agent.rank,
        "sole": _sole_replicas(agent),
        "blocking_s": agent.last_blocking_s,
        "builds": builds[-1],
        "in_flight": agent.gate.in_flight,
        "transfer_s": agent.last_transfer_s,
    }
    store = agent._rdzv.store
    put(store, f"test/verify/{agent.epoch}/{agent.member}", json.dumps(info).encode())


def _forward(agent: ElasticRank, cfg: EngineConfig, builds: list[int]) -> None:
    """The "forward step": a collective on the current group; redone after a recovery."""
    while True:
        token = torch.ones(1, device=agent.world.device)
        try:
            if agent.world.backend == "gloo":  # fail fast when the coordinator marks a death
                agent.wait(agent.world.process_group.allreduce([token]), agent.world)
            else:
                agent.world.all_reduce(token, ReduceOp.SUM)
        except (PeerFailure, GroupClosedError) as failure:  # closed: aborted by the dead-watcher
            agent.recover(failure)
            _publish(agent, Action.RECOVERED.value, builds)
            continue
        if int(token) != agent.world_size:
            raise AssertionError(f"forward all_reduce gave {int(token)}, world {agent.world_size}")
        return


def rank_main(spec: RankSpec) -> None:
    cfg: EngineConfig = spec.config
    builds: list[int] = []
    resources = EpochResources()

    def test_key(key: str) -> bytes | None:
        """A key the test may write (read with a client of its own: any thread may call this)."""
        store = TCPStore(
            spec.store_host,
            spec.store_port,
            is_master=False,
            timeout=timedelta(seconds=spec.timeout_s),
            wait_for_workers=False,
        )
        return store.get(key) if store.check([key]) else None

    def build_a2a(ctx: object) -> tuple[int, int]:
        if spec.member_id in cfg.kill_joiners_in_build:
            os.kill(os.getpid(), signal.SIGKILL)  # die with the weights moved, before the commit
        if test_key("test/fail_build") == str(spec.member_id).encode():
            raise RuntimeError(f"injected build failure on member {spec.member_id}")
        epoch, size = ctx.epoch, ctx.world_size  # type: ignore[attr-defined]
        builds.append(epoch)
        return epoch, size

    resources.register("a2a", build_a2a)
    if spec.member_id in cfg.exit_joiners:
        return
    if spec.member_id in cfg.hang_joiners:
        time.sleep(600)
    failed: set[str] = set()  # the injected failures already raised
    gate = TrafficGate()

    def planner(load: torch.Tensor, num_ranks: int, slots: int, **kw: object) -> Placement:
        mapping = kw.get("rank_mapping")
        rebalance = isinstance(mapping, RankMapping) and mapping.is_identity
        trigger = "rebalance" if rebalance else f"size {num_ranks}"
        armed = cfg.fail_rebalance_once if rebalance else num_ranks == cfg.fail_plan_once_at
        if armed and trigger not in failed:
            failed.add(trigger)
            raise ValueError("injected planner failure")
        return plan(load, num_ranks, slots, **kw)  # type: ignore[arg-type]

    def load() -> torch.Tensor:
        """The test's load if it wrote one, else ``load_of(cfg)`` (called on the staging thread)."""
        written = test_key("test/load")
        return (
            load_of(cfg)
            if written is None
            else torch.tensor(json.loads(written), dtype=torch.float64)
        )

    def kv_bytes() -> int:
        """Asked once per scale, where its KV sync runs (at the transfer poll in poll mode)."""
        if spec.member_id in cfg.kill_at_kv:
            os.kill(os.getpid(), signal.SIGKILL)
        return 2_000_000 - 1000 * spec.member_id

    joiner = spec.role is RankRole.JOINER
    placement = None if joiner else plan(load_of(cfg), len(spec.members), cfg.slots)
    device = _device(cfg, spec.member_id)
    weights = slot_weights(cfg.layers, cfg.slots, placement, 0 if joiner else spec.rank, device)
    try:
        agent = ElasticRank(
            spec,
            weights=weights,
            load=load,
            placement=placement,
            kv_bytes=kv_bytes,
            reload=lambda layer, expert: [
                expert_weight(layer, expert, k).to(device) for k in range(len(KINDS))
            ],
            resources=resources,
            planner=planner,
            gate=gate,
            backend=cfg.backend,
            device=device,
            timeout_s=spec.timeout_s,
            transfer_in_poll=cfg.transfer_in_poll,
        )
    except ReconfigureError:
        return  # the scale this joiner was launched for rolled back
    _publish(agent, "start", builds)
    request_polls = 0  # one long "request" is always in flight while the gate admits work
    while True:
        action = agent.poll()
        if action in (Action.LEAVE, Action.STOP):
            agent.close()
            return
        if action is not Action.SERVE:
            _publish(agent, action.value, builds)
        if gate.in_flight == 0:
            with contextlib.suppress(ScalingInProgress):
                gate.enter()
        elif gate.closed_mode is GateMode.DRAIN:
            request_polls += 1
            if request_polls == 20:  # the request finishes while the scale drains
                gate.leave()
                request_polls = 0
        _forward(agent, cfg, builds)
        time.sleep(0.005)


# ---- the tests (run in the pytest process) -----------------------------------------------------


def _coordinator(cfg: EngineConfig, limits: ScaleLimits) -> ElasticCoordinator:
    return ElasticCoordinator(LocalProcessLauncher(rank_main), limits, config=cfg, timeout_s=10.0)


def _infos(
    coord: ElasticCoordinator, status: ScaleStatus, timeout_s: float = 30.0
) -> dict[int, dict]:
    """Every serving rank's self-check for the status's epoch; fails on any wrong weight."""
    keys = [f"test/verify/{status.epoch}/{m}" for m in status.members]
    coord.store.wait(keys, timedelta(seconds=timeout_s))
    infos = {m: json.loads(coord.store.get(k)) for m, k in zip(status.members, keys, strict=True)}
    for m, info in infos.items():
        assert info["error"] is None, f"member {m}: {info['error']}"
        assert info["world"] == status.world_size
        assert info["rank"] == status.members.index(m)
        assert info["builds"] == status.epoch  # epoch-bound resources rebuilt for this epoch
    return infos


def _recovered(coord: ElasticCoordinator, timeout_s: float) -> ScaleStatus:
    """The status once a recovery has completed, or the last one seen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    status = coord.status()
    while time.monotonic() < deadline:
        if status.event is EventKind.RECOVERY and status.phase is ScalePhase.COMPLETED:
            break
        time.sleep(0.05)
        status = coord.status()
    return status


def _http(url: str, method: str = "GET", body: object = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data, method=method), timeout=10
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scale_2_4_3_1_2_with_bit_exact_weights_kv_http_and_bad_requests() -> None:
    # KV sync, plan and transfer run on the serving thread at one poll, as they do on NCCL.
    cfg = EngineConfig(layers=2, experts=4, slots=4, transfer_in_poll=True)
    coord = _coordinator(cfg, ScaleLimits(num_logical=4, slots_per_rank=4, max_physical_slots=16))
    try:
        status = coord.start(2, timeout_s=60)
        _infos(coord, status)
        with ControlServer(coord) as server:
            for bad, why in (
                ({"world_size": 0}, ">= 1"),
                ({"world_size": 5}, "capacity 16"),
                ({"world_size": 2.5}, "must be an int"),
                ({"world_size": "3"}, "int"),
            ):
                code, body = _http(server.url + "/scale", "POST", bad)
                assert code == 400 and why in body["error"], (bad, body)
            with pytest.raises(ValueError, match="capacity"):
                coord.submit(ScaleRequest(world_size=5))
            assert coord.status() == status  # nothing changed
            code, body = _http(
                server.url + "/scale", "POST", {"world_size": 4, "mode": "drain", "timeout_s": 30}
            )
            assert code == 202 and body["phase"] == "preparing", body
            code, body = _http(server.url + "/scale", "POST", {"world_size": 3})
            assert code == 409, body
            with pytest.raises(ScaleConflict):
                coord.submit(ScaleRequest(world_size=3))
            status = coord.wait(60)
            assert _http(server.url + "/status")[1]["world_size"] == 4
            assert status.phase is ScalePhase.COMPLETED, status
            assert status.members == (0, 1, 2, 3)
            scaled = status
            infos = _infos(coord, status)
            for bad, why in (
                ({"world_size": 4}, "unknown fields"),
                ({"mode": "now"}, "'drain' or"),
                ({"timeout_s": -1}, "positive"),
            ):
                code, body = _http(server.url + "/rebalance", "POST", bad)
                assert code == 400 and why in body["error"], (bad, body)
            code, body = _http(server.url + "/rebalance", "POST", {"mode": "reject"})
            assert code == 202 and body["event"] == "rebalance", body
            assert _http(server.url + "/rebalance", "POST", {})[0] == 409
            assert _http(server.url + "/scale", "POST", {"world_size": 3})[0] == 409
            status = coord.wait(60)
        assert status.phase is ScalePhase.COMPLETED and status.event is EventKind.REBALANCE, status
        assert status.members == scaled.members and status.epoch > scaled.epoch
        _infos(coord, status)  # every rank on the rebalance's epoch, weights bit for bit
        assert [infos[m]["in_flight"] for m in (0, 1)] == [0, 0]  # drained before the commit
        assert {i["kv"] for i in infos.values()} == {2_000_000 - 1000}  # MIN of members 0 and 1
        phases = [p for p, _ in scaled.phase_s]
        assert phases == [
            ScalePhase.PREPARING,
            ScalePhase.SYNCING_KV,
            ScalePhase.REBALANCING,
            ScalePhase.COMMITTING,
        ]
        assert scaled.blocking_s is not None and scaled.blocking_s < 2.0

        for size, mode, members in (
            (3, GateMode.REJECT, (0, 1, 2)),
            (1, GateMode.DRAIN, (0,)),
            (2, GateMode.REJECT, (0, 4)),
        ):
            leavers = [coord.handle(m) for m in status.members if m not in members]
            status = coord.scale(ScaleRequest(world_size=size, mode=mode, timeout_s=30))
            assert status.phase is ScalePhase.COMPLETED, status
            assert status.members == members
            assert all(not h.is_alive() and h.exitcode == 0 for h in leavers)  # type: ignore[attr-defined]
            infos = _infos(coord, status)
            # drain: the request in flight finished before the commit; reject: it ran across
            assert infos[0]["in_flight"] == (0 if mode is GateMode.DRAIN else 1)
            assert infos[0]["transfer_s"] > 0  # part of the blocking time
            assert infos[0]["blocking_s"] >= infos[0]["transfer_s"]
        assert {i["kv"] for i in infos.values()} == {2_000_000}  # joiner 4 learned member 0's
    finally:
        coord.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_joiner_killed_rolls_back_then_scale_then_rank_killed_recovers_with_reload() -> None:
    # KV sync, plan and transfer run on the serving thread at one poll, as they do on NCCL.
    cfg = EngineConfig(
        layers=2,
        experts=8,
        slots=4,
        skew=0.5,
        kill_joiners_in_build=frozenset({3}),
        transfer_in_poll=True,
    )
    coord = _coordinator(cfg, ScaleLimits(num_logical=8, slots_per_rank=4, max_physical_slots=16))
    try:
        before = coord.start(3, timeout_s=60)
        _infos(coord, before)
        status = coord.scale(ScaleRequest(world_size=4, timeout_s=20))
        assert status.phase is ScalePhase.ROLLED_BACK, status
        assert status.error and status.epoch == before.epoch and status.members == (0, 1, 2)

        status = coord.scale(ScaleRequest(world_size=4, timeout_s=20))  # the next one works
        assert status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1, 2, 4)
        scaled = status
        infos = _infos(coord, status)
        # existing ranks transferred at a poll; the joiner, which does not serve yet, did not
        assert all(infos[m]["transfer_s"] > 0 for m in (0, 1, 2)), infos
        assert infos[4]["transfer_s"] == 0

        # The load turns around (expert 7 hottest): a rebalance at the same 4 ranks moves experts.
        flipped = load_of(cfg).flip(1)
        put(coord.store, "test/load", json.dumps(flipped.tolist()).encode())
        coord.submit(RebalanceRequest(timeout_s=20))
        for second in (RebalanceRequest(), ScaleRequest(world_size=3)):
            with pytest.raises(ScaleConflict, match="rebalance is running"):
                coord.submit(second)
        status = coord.wait(60)
        assert status.phase is ScalePhase.COMPLETED and status.event is EventKind.REBALANCE, status
        assert status.members == scaled.members and status.epoch > scaled.epoch
        assert [p for p, _ in status.phase_s] == [
            ScalePhase.PREPARING,
            ScalePhase.SYNCING_KV,
            ScalePhase.REBALANCING,
            ScalePhase.COMMITTING,
        ]
        assert status.blocking_s is not None and status.experts_moved
        assert status.balance_before is not None and status.balance_after is not None
        assert status.balance_after > status.balance_before + 0.05, status
        infos = _infos(coord, status)  # moved weights bit for bit; resources rebuilt
        assert all(info["transfer_s"] > 0 for info in infos.values()), infos

        victim = max(infos, key=lambda m: infos[m]["sole"])
        assert infos[victim]["sole"] > 0  # its death loses experts: they must be reloaded
        killed = time.monotonic()
        coord.handle(victim).kill()
        status = _recovered(coord, 60)
        assert status.phase is ScalePhase.COMPLETED and status.event is EventKind.RECOVERY, status
        # the coordinator marks the dead member, the watchers abort the polls blocked on it: no
        # survivor waits for the 10 s group timeout (then the recovery window) to notice
        assert time.monotonic() - killed < 9.0, time.monotonic() - killed
        assert status.dead_members == (victim,)
        assert status.members == tuple(m for m in (0, 1, 2, 4) if m != victim)
        assert status.lost_experts == infos[victim]["sole"]
        assert status.blocking_s is not None
        _infos(coord, status)  # reloaded experts bit for bit too
    finally:
        coord.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_planner_error_joiner_gone_and_timeout_roll_back_then_scale_works() -> None:
    cfg = EngineConfig(
        layers=2,
        experts=8,
        slots=4,
        fail_plan_once_at=2,
        fail_rebalance_once=True,
        exit_joiners=frozenset({3}),
        hang_joiners=frozenset({4}),
    )
    coord = _coordinator(cfg, ScaleLimits(num_logical=8, slots_per_rank=4, max_physical_slots=16))
    try:
        start = coord.start(3, timeout_s=60)
        _infos(coord, start)

        status = coord.rebalance(RebalanceRequest(timeout_s=20))
        assert status.phase is ScalePhase.ROLLED_BACK and status.event is EventKind.REBALANCE
        assert "injected planner failure" in (status.error or ""), status
        assert (status.epoch, status.members) == (start.epoch, start.members)

        # Weights staged for a new load, then member 1's epoch resources fail at the commit: every
        # rank rolls back and serves the old placement with its old weights, bit for bit.
        hot_last = [[1.0] * 7 + [20.0]] * cfg.layers  # 6 experts move for this (checked below)
        put(coord.store, "test/load", json.dumps(hot_last).encode())
        put(coord.store, "test/fail_build", b"1")
        status = coord.rebalance(RebalanceRequest(timeout_s=20))
        coord.store.delete_key("test/fail_build")
        assert status.phase is ScalePhase.ROLLED_BACK, status
        assert "injected build failure on member 1" in (status.error or ""), status
        assert (status.epoch, status.members) == (start.epoch, start.members)
        deadline = time.monotonic() + 30
        infos: dict[int, dict] = {}
        while len(infos) < len(start.members) and time.monotonic() < deadline:
            for m in start.members:  # each rank re-checks its weights after its rollback
                info = json.loads(coord.store.get(f"test/verify/{start.epoch}/{m}"))
                if info["event"] == Action.ROLLED_BACK.value:
                    infos[m] = info
            time.sleep(0.02)
        assert sorted(infos) == list(start.members), infos
        assert all(info["error"] is None for info in infos.values()), infos
        serving = plan(load_of(cfg), 3, cfg.slots)  # what the ranks started from and still serve
        staged = plan(
            torch.tensor(hot_last, dtype=torch.float64),
            3,
            cfg.slots,
            previous=serving,
            rank_mapping=RankMapping.identity(3),
        )
        assert int(staged.transfers_from(serving).sum()) > 0  # the rollback had weights to drop

        status = coord.scale(ScaleRequest(world_size=2, timeout_s=20))  # scale-down path
        assert status.phase is ScalePhase.ROLLED_BACK, status
        assert "injected planner failure" in (status.error or ""), status
        assert (status.epoch, status.members) == (start.epoch, start.members)

        began = time.monotonic()
        status = coord.scale(ScaleRequest(world_size=4, timeout_s=20))  # joiner 3 never connects
        assert status.phase is ScalePhase.ROLLED_BACK, status
        assert "aborted" in (status.error or "") and time.monotonic() - began < 15, status

        began = time.monotonic()
        status = coord.scale(ScaleRequest(world_size=4, mode=GateMode.REJECT, timeout_s=3))
        assert status.phase is ScalePhase.ROLLED_BACK, status  # joiner 4 hangs: timeout
        assert time.monotonic() - began < 20
        assert (status.epoch, status.members) == (start.epoch, start.members)

        status = coord.scale(ScaleRequest(world_size=2, timeout_s=20))
        assert status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1)
        _infos(coord, status)
    finally:
        coord.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_leaver_killed_in_a_scale_down_over_the_serving_group_then_survivors_recover() -> None:
    # At a poll, a scale-down moves weights over the serving world group itself. The leaver dies
    # as that poll begins: the others sync KV on the new group (it is not in it), then wait for
    # it on the serving group, which breaks. The scale fails, the survivors recover, bit for bit.
    cfg = EngineConfig(
        layers=2, experts=8, slots=4, transfer_in_poll=True, kill_at_kv=frozenset({3})
    )
    coord = _coordinator(cfg, ScaleLimits(num_logical=8, slots_per_rank=4, max_physical_slots=16))
    try:
        start = coord.start(4, timeout_s=60)
        _infos(coord, start)
        coord.submit(ScaleRequest(world_size=3, timeout_s=20))
        status = _recovered(coord, 90)
        assert status.event is EventKind.RECOVERY and status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1, 2) and status.dead_members == (3,), status
        _infos(coord, status)  # every survivor serves its experts, bit for bit

        status = coord.scale(ScaleRequest(world_size=2, timeout_s=20))  # the world still scales
        assert status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1)
        _infos(coord, status)
    finally:
        coord.shutdown()
