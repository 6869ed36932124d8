"""The coordinator's failure races, each with real rank processes (the toy engine) over gloo.

Each test is the regression test of one failure found by a fault sweep; the hooks that widen a
race window are the toy engine's (elastic_ep.testing.toy_engine.ToyConfig) and named where used.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from torch.distributed import TCPStore

from elastic_ep.scaling import (
    ElasticCoordinator,
    LocalProcessLauncher,
    ScaleConflict,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.status import EventKind
from elastic_ep.testing.toy_engine import ToyConfig, check_weights, rank_main


def _coordinator(cfg: ToyConfig, timeout_s: float) -> ElasticCoordinator:
    limits = ScaleLimits(
        num_logical=cfg.experts, slots_per_rank=cfg.slots, max_physical_slots=8 * cfg.slots
    )
    return ElasticCoordinator(
        LocalProcessLauncher(rank_main), limits, config=cfg, timeout_s=timeout_s
    )


def _client(coord: ElasticCoordinator) -> TCPStore:
    """A store client of the test's own: a blocking wait on ``coord.store`` would hold up the
    coordinator's threads, which share that client."""
    host, port = coord.store_address
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))


def _final_recovery(coord: ElasticCoordinator, timeout_s: float) -> ScaleStatus:
    """The status once a recovery has ended (completed or failed), bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    status = coord.status()
    while time.monotonic() < deadline:
        if status.event is EventKind.RECOVERY and status.phase.is_final:
            break
        time.sleep(0.02)
        status = coord.status()
    return status


@pytest.mark.timeout(120)
def test_a_death_after_a_committed_scale_up_recovers_with_the_joiners() -> None:
    # Hook: member 0's old-epoch teardown after the commit takes 3 s, so the coordinator lacks
    # its report when member 2 dies. Before the fix the coordinator killed the joiner (then a
    # serving member), and the job ended in "recovery failed" with every rank dead.
    cfg = ToyConfig(experts=4, slots=4, slow_teardown={0: 3.0})
    coord = _coordinator(cfg, timeout_s=5.0)
    try:
        store = _client(coord)
        start = coord.start(3, timeout_s=60)
        assert check_weights(store, start, 30) is None
        coord.submit(ScaleRequest(world_size=4, timeout_s=30))
        store.wait(["toy/tearing/0"], timedelta(seconds=30))  # committed, not reported
        coord.handle(2).kill()
        status = _final_recovery(coord, 60)
        assert status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1, 3) and status.dead_members == (2,), status
        assert coord.handle(3).is_alive()
        assert check_weights(store, status, 30) is None
        status = coord.scale(ScaleRequest(world_size=2, timeout_s=30))  # it still scales
        assert status.phase is ScalePhase.COMPLETED and status.members == (0, 1), status
        assert check_weights(store, status, 30) is None
    finally:
        coord.shutdown()


@pytest.mark.timeout(120)
def test_ranks_starting_up_later_than_the_group_timeout_start_and_join() -> None:
    # Hook: initial member 2 and joiner 3 start up 4 s late; the group timeout is 2 s. Before the
    # fix their peers gave up the group build after 2 s: start() failed, and the scale rolled
    # back (a cold `python -m` rank took 12-21 s to import torch on a loaded 2-core machine).
    cfg = ToyConfig(experts=4, slots=4, start_delay={2: 4.0, 3: 4.0})
    coord = _coordinator(cfg, timeout_s=2.0)
    try:
        store = _client(coord)
        start = coord.start(3, timeout_s=60)
        assert start.members == (0, 1, 2), start
        assert check_weights(store, start, 30) is None
        status = coord.scale(ScaleRequest(world_size=4, timeout_s=30))
        assert status.phase is ScalePhase.COMPLETED and status.members == (0, 1, 2, 3), status
        assert check_weights(store, status, 30) is None
    finally:
        coord.shutdown()


@pytest.mark.timeout(120)
def test_a_leaver_killed_mid_scale_down_is_marked_dead_at_once() -> None:
    # Hook: member 3 (the leaver) SIGKILLs itself when the scale asks for its KV bytes. Before
    # the fix the monitor skipped leavers, so the survivors waited out the recovery window
    # (group timeout + 1 s = 21 s here); marked dead, they recover in a few seconds.
    timeout_s = 20.0
    cfg = ToyConfig(experts=4, slots=4, kill_at_kv=frozenset({3}))
    coord = _coordinator(cfg, timeout_s=timeout_s)
    try:
        store = _client(coord)
        coord.start(4, timeout_s=60)
        began = time.monotonic()
        coord.submit(ScaleRequest(world_size=3, timeout_s=60))
        status = _final_recovery(coord, 90)
        took = time.monotonic() - began
        assert status.phase is ScalePhase.COMPLETED, status
        assert status.members == (0, 1, 2) and status.dead_members == (3,), status
        assert took < timeout_s, took  # the bound is the dead mark's, not the group timeout's
        assert check_weights(store, status, 30) is None
    finally:
        coord.shutdown()


@pytest.mark.timeout(120)
def test_an_unrecoverable_world_is_reported_at_once_with_the_planners_error() -> None:
    # 2 ranks, 8 experts, 4 slots each: the survivor cannot hold every expert. Before the fix
    # the status sat in "recovering" for 3x the timeout + 10 s, then blamed the survivors.
    cfg = ToyConfig(experts=8, slots=4)
    coord = _coordinator(cfg, timeout_s=5.0)
    try:
        store = _client(coord)
        coord.start(2, timeout_s=60)
        coord.handle(1).kill()
        status = _final_recovery(coord, 60)
        assert status.phase is ScalePhase.FAILED, status
        assert "planning without dead ranks [1] failed" in (status.error or ""), status
        assert status.members == (), status  # nothing serves any more
        assert coord.handle(0).join(30)  # the survivor exits (ReconfigureError)
        assert coord.handle(0).exitcode == 3  # type: ignore[attr-defined]
        assert b"planning without dead ranks" in store.get("toy/exit/0")
        time.sleep(0.5)  # the survivor's exit must not start another recovery
        assert coord.status() == status
        with pytest.raises(ScaleConflict, match="no rank serves any more: recovery failed"):
            coord.submit(ScaleRequest(world_size=2))
    finally:
        coord.shutdown()


@pytest.mark.timeout(120)
def test_a_second_death_during_recovery_recovers_again() -> None:
    # Hook: member 0, the survivors' planning rank, SIGKILLs itself in the recovery's planner.
    # Before the fix member 1 got PeerFailure out of recover() and crashed; now the survivors
    # agree again without member 0 (no weight had moved) and member 1 serves alone.
    cfg = ToyConfig(experts=4, slots=4, kill_in_recovery_plan=frozenset({0}))
    coord = _coordinator(cfg, timeout_s=5.0)
    try:
        store = _client(coord)
        coord.start(3, timeout_s=60)
        coord.handle(2).kill()
        deadline = time.monotonic() + 60
        status = coord.status()
        while time.monotonic() < deadline and status.members != (1,):
            time.sleep(0.02)
            status = coord.status()
        assert status.event is EventKind.RECOVERY and status.phase is ScalePhase.COMPLETED
        assert status.members == (1,) and set(status.dead_members) == {0, 2}, status
        assert check_weights(store, status, 30) is None
    finally:
        coord.shutdown()
