"""Dead peers: PeerFailure within the timeout, abort/destroy never hang, and repeated
kill/rebuild cycles leak no file descriptors or threads in the survivors."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import ElasticWorld, GroupClosedError, Rendezvous, StatelessGroup
from tests.procs import run_ranks

TIMEOUT_S = 1.0
CYCLES = 20


def _resources() -> tuple[int, int, int]:
    """(open fds, Python threads, OS threads) of this process, once they have settled.

    A joined thread can still be listed in /proc for a moment (join returns just before the OS
    thread exits), so read until two readings 10 ms apart agree.
    """

    def read() -> tuple[int, int, int]:
        return (
            len(os.listdir("/proc/self/fd")),
            threading.active_count(),
            len(os.listdir("/proc/self/task")),
        )

    last = read()
    for _ in range(100):
        time.sleep(0.01)
        now = read()
        if now == last:
            return now
        last = now
    return last


SURVIVORS = 3


def _victim(port: int, cycle: int) -> None:
    """Waits for its cycle, joins the world as a fresh member and serves until it is killed."""
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=200)
    rdzv.store.set(f"faults/pid/{cycle}", str(os.getpid()))
    rdzv.store.wait([f"faults/go/{cycle}"])
    world = ElasticWorld(rdzv, 100 + cycle, timeout_s=TIMEOUT_S, build_timeout_s=20)
    world.commit(world.prepare([*range(SURVIVORS), 100 + cycle], epoch=2 * cycle + 1))
    world.group.all_reduce(torch.ones(1))  # the survivors' check of the new epoch
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        world.group.all_reduce(torch.ones(64))


def _kill_cycles(rank: int, world_size: int, port: int) -> dict[str, object] | None:
    # Ranks >= SURVIVORS are the victims, one per cycle, started up front: a fresh process per
    # cycle without paying a Python + torch start each time.
    if rank >= SURVIVORS:
        _victim(port, rank - SURVIVORS)
        return None
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=200)
    world = ElasticWorld(rdzv, rank, timeout_s=TIMEOUT_S, build_timeout_s=20)
    survivors = list(range(SURVIVORS))
    world.start(survivors)
    detect_s: list[float] = []
    resources: list[tuple[int, int, int]] = []
    for cycle in range(CYCLES):
        epoch = 2 * cycle + 1
        if rank == 0:
            rdzv.store.set(f"faults/go/{cycle}", "1")
        world.commit(world.prepare([*survivors, 100 + cycle], epoch=epoch))
        assert world.group.all_reduce(torch.ones(1)).item() == 4
        killer = None
        if rank == 0:
            pid = int(rdzv.store.get(f"faults/pid/{cycle}"))
            killer = threading.Timer(0.2, os.kill, (pid, signal.SIGKILL))
            killer.start()
        start = time.monotonic()
        try:
            while time.monotonic() - start < 10 * TIMEOUT_S:
                world.group.all_reduce(torch.ones(64))
            raise AssertionError("no PeerFailure after the victim was killed")
        except PeerFailure as err:
            assert (err.group, err.epoch) == ("world", epoch)
            detect_s.append(time.monotonic() - start)
        if killer is not None:
            killer.join()
        world.reconfigure(survivors, epoch=epoch + 1)
        assert world.group.all_reduce(torch.ones(1)).item() == 3
        assert world.join_retired(5.0)  # the old groups' teardown runs in the background
        resources.append(_resources())
    world.group.barrier()
    world.close()
    return {"detect_s": detect_s, "resources": resources}


@pytest.mark.slow
def test_kill_rebuild_cycles_without_leaks() -> None:
    outs = run_ranks(
        _kill_cycles,
        SURVIVORS + CYCLES,
        timeout=240,
        expect_dead=range(SURVIVORS, SURVIVORS + CYCLES),
    )
    for rank, out in enumerate(outs[:SURVIVORS]):
        # The kill comes 0.2 s into the loop; the failure must surface within 2x the timeout.
        assert max(out["detect_s"]) < 0.2 + 2 * TIMEOUT_S, out["detect_s"]
        resources = out["resources"]
        # After two warm-up cycles nothing may grow. Rank 0 also runs the store server, whose
        # fds follow the victims' connections (opened by each joiner, closed some time after its
        # death), so only its threads are compared; the other ranks must stay exactly level.
        base = resources[2]
        for later in resources[3:]:
            if rank:
                assert later == base, (rank, resources)
            else:
                assert later[1:] == base[1:], (rank, resources)


def _dead_peer_teardown(rank: int, world_size: int, port: int) -> dict[str, float]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    a = StatelessGroup(rdzv, "a", 0, rank, world_size, timeout_s=5)
    b = StatelessGroup(rdzv, "b", 0, rank, world_size, timeout_s=5)
    a.barrier()
    if rank == 1:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    out: dict[str, float] = {}
    # An async receive that its peer never sends is pending; abort must not wait for it.
    handle = a.batch_p2p([], [(torch.zeros(8), 1)], async_op=True)
    start = time.monotonic()
    a.abort()
    out["abort_s"] = time.monotonic() - start
    try:
        a.all_reduce(torch.ones(1))
    except GroupClosedError:
        out["closed"] = 1.0
    del handle
    time.sleep(0.6)  # the peer is dead now
    # destroy() of a group whose peer died (not yet noticed) must not hang either.
    start = time.monotonic()
    b.destroy()
    out["destroy_s"] = time.monotonic() - start
    return out


def test_abort_and_destroy_with_dead_peer_do_not_hang() -> None:
    out = run_ranks(_dead_peer_teardown, 2, timeout=60, expect_dead=[1])[0]
    assert out["abort_s"] < 1.0
    assert out["closed"] == 1.0
    assert out["destroy_s"] < 1.0


def _peer_stops_answering(rank: int, world_size: int, port: int) -> dict[str, object]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    g = StatelessGroup(rdzv, "g", 0, rank, world_size, timeout_s=1.5)
    g.barrier()
    if rank == 2:
        time.sleep(3.5)  # alive but silent: a hung peer, not a dead one
        return {}
    start = time.monotonic()
    out: dict[str, object] = {}
    try:
        g.all_reduce(torch.ones(1))
    except PeerFailure as err:
        out["elapsed"] = time.monotonic() - start
        out["group"] = (err.group, err.epoch)
    start = time.monotonic()
    try:
        g.broadcast(torch.ones(1), src=0)
    except PeerFailure as err:
        out["broken_at_once"] = time.monotonic() - start < 0.1 and "broken" in str(err)
    g.abort()
    return out


def test_hung_peer_raises_peer_failure_within_timeout() -> None:
    outs = run_ranks(_peer_stops_answering, 3, timeout=60)
    for out in outs[:2]:
        assert 1.4 < out["elapsed"] < 3.0, out
        assert out["group"] == ("g", 0)
        assert out["broken_at_once"] is True
