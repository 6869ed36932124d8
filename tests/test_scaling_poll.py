"""The pipelined poll: every rank acts on the same vote at the same step; a rank that dies between
posting its vote and the next poll's read is detected and the survivors recover.

Real rank processes over gloo, driven by the real coordinator. Each rank counts its forward
steps per epoch; a forward is a MAX all-reduce of that count on the world group, so a rank that
acted one step early or late would see another count (and record the mismatch).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed import AllreduceOptions, ReduceOp

from elastic_ep.eplb.planner import plan
from elastic_ep.errors import PeerFailure, ReconfigureError
from elastic_ep.groups import GroupClosedError, Rendezvous, StatelessGroup
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
from elastic_ep.scaling.poll import Vote, dissemination_max, dissemination_partners
from elastic_ep.scaling.status import EventKind
from tests.procs import run_ranks

LAYERS, EXPERTS, SLOTS = 1, 4, 2


@dataclass(frozen=True)
class PollConfig:
    forward_collective: bool = True  # False: only the poll's vote can notice a dead peer
    die_after_poll: int | None = None  # member that SIGKILLs itself right after a poll ...
    die_at_step: int = 30  # ... at this step of its first epoch


def _forward(agent: ElasticRank, step: int) -> int | None:
    """MAX all-reduce of ``step`` on the world group; returns the result (None: recovered)."""
    world = agent.world
    token = torch.tensor([step], dtype=torch.int64)
    opts = AllreduceOptions()
    opts.reduceOp = ReduceOp(ReduceOp.MAX)
    try:
        agent.wait(world.process_group.allreduce([token], opts), world)
    except (PeerFailure, GroupClosedError) as failure:
        agent.recover(failure)
        return None
    return int(token)


def rank_main(spec: RankSpec) -> None:
    cfg: PollConfig = spec.config
    joiner = spec.role is RankRole.JOINER
    placement = None if joiner else plan(torch.ones(LAYERS, EXPERTS), len(spec.members), SLOTS)
    try:
        agent = ElasticRank(
            spec,
            weights=[[torch.zeros(SLOTS, 2)] for _ in range(LAYERS)],
            load=lambda: torch.ones(LAYERS, EXPERTS),
            placement=placement,
            kv_bytes=lambda: 1 << 20,
            timeout_s=spec.timeout_s,
        )
    except ReconfigureError:
        return
    store = agent._rdzv.store
    step = 0  # forward steps in the serving epoch
    events: list[dict] = []
    mismatches: list[str] = []

    def publish() -> None:
        put(
            store,
            f"test/poll/{spec.member_id}",
            json.dumps({"events": events, "mismatches": mismatches}).encode(),
        )

    publish()
    while True:
        action = agent.poll()
        if action is not Action.SERVE:
            events.append({"action": action.value, "epoch": agent.epoch, "after_steps": step})
            step = 0
            publish()
        if action in (Action.LEAVE, Action.STOP):
            agent.close()
            return
        mine = spec.member_id == cfg.die_after_poll and agent.epoch == spec.epoch
        if mine and step == cfg.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # its vote is posted; nobody read it yet
        if cfg.forward_collective:
            agreed = _forward(agent, step)
            if agreed is None:  # recovered in the forward: the new epoch starts counting
                events.append({"action": "recovered", "epoch": agent.epoch, "after_steps": step})
                step = 0
                publish()
                continue
            if agreed != step:
                mismatches.append(f"epoch {agent.epoch}: step {step}, the others at {agreed}")
                publish()
        step += 1
        time.sleep(0.005)


def _coordinator(cfg: PollConfig, ranks: int, timeout_s: float = 20.0) -> ElasticCoordinator:
    limits = ScaleLimits(EXPERTS, SLOTS, (ranks + 1) * SLOTS)
    return ElasticCoordinator(
        LocalProcessLauncher(rank_main), limits, config=cfg, timeout_s=timeout_s
    )


def _logs(coord: ElasticCoordinator, members: tuple[int, ...]) -> dict[int, dict]:
    return {m: json.loads(coord.store.get(f"test/poll/{m}")) for m in members}


def _events_of(coord: ElasticCoordinator, status: ScaleStatus, action: str) -> dict[int, dict]:
    """Each member's event of ``action`` that made ``status.epoch`` (waits for all, bounded)."""
    deadline = time.monotonic() + 30
    while True:
        logs = _logs(coord, status.members)
        found = {
            m: next(
                (e for e in log["events"] if e["epoch"] == status.epoch and e["action"] == action),
                None,
            )
            for m, log in logs.items()
        }
        if all(found.values()) or time.monotonic() > deadline:
            assert all(found.values()), logs
            return found  # type: ignore[return-value]
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_every_rank_commits_at_the_same_step_under_the_pipelined_poll() -> None:
    coord = _coordinator(PollConfig(), ranks=4)
    try:
        start = coord.start(3, timeout_s=60)
        time.sleep(0.3)
        for size in (4, 3):
            before = coord.status()
            status = coord.scale(ScaleRequest(world_size=size, timeout_s=30))
            assert status.phase is ScalePhase.COMPLETED, status
            committed = _events_of(coord, status, Action.COMMITTED.value)
            stayed = [m for m in before.members if m in status.members]
            # ranks that served the old epoch committed after the same number of its steps
            assert len({committed[m]["after_steps"] for m in stayed}) == 1, committed
            assert committed[stayed[0]]["after_steps"] > 0
        time.sleep(0.3)  # more forward steps on the last epoch: they must agree too
        logs = _logs(coord, (*start.members, 3))
        assert all(not log["mismatches"] for log in logs.values()), logs
    finally:
        coord.shutdown()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("forward_collective", [False, True], ids=["vote-only", "with-forward"])
def test_a_rank_dying_between_the_post_and_the_read_is_recovered(
    forward_collective: bool,
) -> None:
    # vote-only: no forward collective, so the survivors learn of the death from the vote they
    # posted (its read fails: a gloo error from the dead partner, or the coordinator's mark).
    cfg = PollConfig(forward_collective=forward_collective, die_after_poll=1)
    timeout_s = 30.0
    coord = _coordinator(cfg, ranks=4, timeout_s=timeout_s)
    try:
        start = coord.start(4, timeout_s=60)
        deadline = time.monotonic() + 60
        status = coord.status()
        while not (status.event is EventKind.RECOVERY and status.phase is ScalePhase.COMPLETED):
            assert time.monotonic() < deadline, status
            time.sleep(0.02)
            status = coord.status()
        died = coord.status()
        assert died.dead_members == (1,) and died.members == (0, 2, 3), died
        recovered = _events_of(coord, died, "recovered")
        # detected through the coordinator's mark or gloo, well inside the group timeout
        assert recovered and died.blocking_s is not None and died.blocking_s < timeout_s / 2
        assert start.epoch < died.epoch
        status = coord.scale(ScaleRequest(world_size=2, timeout_s=30))  # the survivors scale
        assert status.phase is ScalePhase.COMPLETED and status.members == (0, 2), status
        committed = _events_of(coord, status, Action.COMMITTED.value)
        assert len({e["after_steps"] for e in committed.values()}) == 1, committed
        logs = _logs(coord, (0, 2, 3))
        assert all(not log["mismatches"] for log in logs.values()), logs
    finally:
        coord.shutdown()


# ---- the vote itself -----------------------------------------------------------------------


@settings(deadline=None)  # pure, but a loaded 2-core CI machine can stall it
@given(st.integers(1, 70), st.data())
def test_dissemination_rounds_reach_the_max_at_every_rank(world_size: int, data) -> None:  # type: ignore[no-untyped-def]
    values = data.draw(st.lists(st.integers(0, 99), min_size=world_size, max_size=world_size))
    held = list(values)
    partners = [dissemination_partners(r, world_size) for r in range(world_size)]
    rounds = len(partners[0])
    assert rounds == (world_size - 1).bit_length()  # ceil(log2 R)
    for i in range(rounds):
        sent = {partners[r][i][0]: held[r] for r in range(world_size)}
        assert all(partners[partners[r][i][0]][i][1] == r for r in range(world_size))
        held = [max(held[r], sent[r]) for r in range(world_size)]
    assert held == [max(values)] * world_size


def test_vote_round_trips_through_a_tensor() -> None:
    vote = Vote(seq=7, busy=True, failed=False, not_waiting=False, aborted=True)
    assert Vote.from_tensor(vote.to_tensor()) == vote


def _max_worker(rank: int, world_size: int, port: int, seed: int) -> list[int]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    group = StatelessGroup(rdzv, "vote", 0, rank, world_size, timeout_s=30)
    gen = random.Random(seed * 100 + rank)
    flags = torch.tensor([gen.randrange(1000) for _ in range(5)], dtype=torch.int64)
    mine = flags.tolist()
    dissemination_max(group.process_group, rank, world_size, flags, lambda w: w.wait())
    group.destroy()
    return [*mine, *flags.tolist()]


@pytest.mark.parametrize("world_size", [1, 3, 5])
def test_dissemination_max_over_real_processes(world_size: int) -> None:
    out = run_ranks(_max_worker, world_size, world_size, timeout=60)
    want = [max(o[i] for o in out) for i in range(5)]
    assert all(o[5:] == want for o in out), out


def test_a_dead_mark_wakes_the_watcher_and_looking_reads_no_store() -> None:
    server = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=10)
    try:
        from elastic_ep.scaling.channel import ControlChannel
        from elastic_ep.scaling.deaths import DeadWatch, DeathWatcher
        from elastic_ep.testing.counting_store import CountingStore, StoreCounts

        channel = ControlChannel(server.store, 10)
        channel.mark_dead(9)  # before the watcher: found by its first read
        counts = StoreCounts(lambda key: key)
        watcher = DeathWatcher(CountingStore(server.store.clone(), counts))
        watch = DeadWatch(watcher, (0, 1, 2))
        assert watcher.dead == {9} and watch.dead() == []
        for _ in range(1000):
            assert watch.dead() == []
        # its own first add and multi_get, then one wait in flight: looks cost nothing
        assert sum(counts.calls.values()) <= 3, counts.calls
        channel.mark_dead(1)
        deadline = time.monotonic() + 10
        while not watch.dead() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert watch.dead() == [1] and watcher.dead == {1, 9}
        assert counts.calls["ctl/dead/n/2"] == 2  # the wait that the mark woke, and its get
        assert channel.dead_count() == 2
        server.store.wait(["ctl/dead/1"], timedelta(seconds=1))
        watcher.stop()
    finally:
        server.close()
