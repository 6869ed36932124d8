"""StatelessGroup over gloo in real processes: every collective, P2P, objects, bad input."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import GroupClosedError, Rendezvous, StatelessGroup
from tests.procs import run_ranks


def _rdzv(rank: int, port: int) -> Rendezvous:
    return Rendezvous("127.0.0.1", port, is_master=False, timeout_s=20)


def _collectives(rank: int, world_size: int, port: int) -> dict[str, object]:
    rdzv = _rdzv(rank, port)
    g = StatelessGroup(rdzv, "world", 0, rank, world_size, timeout_s=10)
    out: dict[str, object] = {}
    out["sum"] = g.all_reduce(torch.tensor([rank + 1.0, 2.0 * rank])).tolist()
    out["max"] = g.all_reduce(torch.tensor([rank]), op=dist.ReduceOp.MAX).item()
    pending_sum = torch.tensor([float(rank)])
    reduced = g.all_reduce(pending_sum, async_op=True)
    reduced.wait()
    reduced.raise_if_failed()
    out["async_sum"] = pending_sum.item()
    try:
        g.all_reduce(torch.zeros(1), sync=True, async_op=True)
    except ValueError as err:
        out["sync_and_async"] = str(err)
    t = torch.full((2,), float(rank))
    dist.all_reduce(t, group=g.process_group)
    out["torch_all_reduce"] = t.tolist()
    out["bcast"] = g.broadcast(torch.full((3,), float(rank)), src=2).tolist()
    out["objects"] = g.all_gather_object({"rank": rank, "pad": "x" * rank * 100})
    out["bobj"] = g.broadcast_object(("from", rank) if rank == 1 else None, src=1)

    # all_to_all_single with uneven splits: rank r sends (r + j) % 3 rows to rank j, row values
    # encode (sender, receiver, index).
    in_splits = [(rank + j) % 3 for j in range(world_size)]
    out_splits = [(j + rank) % 3 for j in range(world_size)]
    rows = [[rank * 100 + j * 10 + k] for j in range(world_size) for k in range(in_splits[j])]
    inp = torch.tensor(rows, dtype=torch.int64).reshape(-1, 1)
    outp = torch.full((sum(out_splits), 1), -1, dtype=torch.int64)
    g.all_to_all_single(outp, inp, out_splits, in_splits)
    out["a2a"] = outp.flatten().tolist()
    even = g.all_to_all_single(
        torch.empty(world_size * 2), torch.arange(world_size * 2.0) + 10 * rank
    )
    out["a2a_even"] = even.tolist()

    # ring: two tensors to the right neighbour (ordered), one self transfer; sync then async.
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    a, b = torch.zeros(4), torch.zeros(2, dtype=torch.int64)
    own = torch.zeros(3)
    g.batch_p2p(
        [
            (torch.full((4,), float(rank)), right),
            (torch.tensor([rank, 7]), right),
            (torch.ones(3) * rank, rank),
        ],
        [(a, left), (b, left), (own, rank)],
    )
    out["ring"] = (a.tolist(), b.tolist(), own.tolist())
    c = torch.zeros(5)
    handle = g.batch_p2p([(torch.arange(5.0) * rank, left)], [(c, right)], async_op=True)
    assert handle is not None
    handle.wait()
    out["ring_async"] = c.tolist()
    # A prepared batch posts the tensors it was given, each time it is posted.
    outgoing, incoming = torch.zeros(2), torch.zeros(2)
    batch = g.prepare_p2p([(outgoing, right)], [(incoming, left)])
    posted = []
    for round_ in (1.0, 2.0):
        outgoing.fill_(10 * round_ + rank)
        batch.post().wait()
        posted.append(incoming.tolist())
    out["prepared"] = posted
    g.barrier()
    g.destroy()
    g.destroy()
    try:
        g.barrier()
    except GroupClosedError:
        out["closed"] = True
    return out


def test_collectives_p2p_objects() -> None:
    ws = 4
    results = run_ranks(_collectives, ws, timeout=60)
    for rank, out in enumerate(results):
        assert out["sum"] == [10.0, 12.0]
        assert out["max"] == 3
        assert out["async_sum"] == 6.0
        assert "cannot go with async_op" in str(out["sync_and_async"])
        assert out["torch_all_reduce"] == [6.0, 6.0]
        assert out["bcast"] == [2.0, 2.0, 2.0]
        assert out["objects"] == [{"rank": r, "pad": "x" * r * 100} for r in range(ws)]
        assert out["bobj"] == ("from", 1)
        expected = [j * 100 + rank * 10 + k for j in range(ws) for k in range((j + rank) % 3)]
        assert out["a2a"] == expected
        assert out["a2a_even"] == [
            float(10 * j + 2 * rank + k) for j in range(ws) for k in range(2)
        ]
        left, right = (rank - 1) % ws, (rank + 1) % ws
        assert out["ring"] == ([float(left)] * 4, [left, 7], [float(rank)] * 3)
        assert out["ring_async"] == [float(k * right) for k in range(5)]
        assert out["prepared"] == [[10.0 + left] * 2, [20.0 + left] * 2]
        assert out["closed"] is True


def _standby(rank: int, world_size: int, port: int) -> list[float]:
    rdzv = _rdzv(rank, port)
    old = StatelessGroup(rdzv, "world", 0, rank, world_size, timeout_s=10)
    # The next epoch is built while the old one is still used in between (and afterwards).
    before = old.all_reduce(torch.tensor([1.0])).item()
    new = StatelessGroup(rdzv, "world", 1, world_size - 1 - rank, world_size, timeout_s=10)
    during = old.all_reduce(torch.tensor([2.0])).item()
    after = new.all_reduce(torch.tensor([float(new.rank)])).item()
    old.destroy()
    again = new.all_reduce(torch.tensor([3.0])).item()
    new.destroy()
    return [before, during, after, again]


def test_standby_groups_side_by_side() -> None:
    assert run_ranks(_standby, 3, timeout=60) == [[3.0, 6.0, 3.0, 9.0]] * 3


def _missing_peer(rank: int, world_size: int, port: int) -> tuple[float, int | None, str]:
    rdzv = _rdzv(rank, port)
    start = time.monotonic()
    try:
        StatelessGroup(rdzv, "g", 0, rank, world_size + 1, timeout_s=1.5)
    except PeerFailure as err:
        return time.monotonic() - start, err.member, str(err)
    raise AssertionError("built a group with a missing rank")


def test_build_with_missing_rank_raises_peer_failure_in_time() -> None:
    ((elapsed, member, msg),) = run_ranks(_missing_peer, 1, timeout=30)
    assert 1.4 < elapsed < 3.0
    assert member == 1
    assert "'g' epoch 0" in msg


LATE_BUILD_S = 2.0


def _late_rank(rank: int, world_size: int, port: int) -> tuple[str, float]:
    """Rank 1 arrives after rank 0 gave up waiting for it (a joiner launched late)."""
    rdzv = _rdzv(rank, port)
    if rank == 1:
        rdzv.store.wait(["late/gave_up"])
    start = time.monotonic()
    try:
        g = StatelessGroup(rdzv, "late", 0, rank, world_size, build_timeout_s=LATE_BUILD_S)
        g.all_reduce(torch.ones(1))
        outcome = "built"
    except PeerFailure:
        outcome = "PeerFailure"
    if rank == 0:
        rdzv.store.set("late/gave_up", "1")
    return outcome, time.monotonic() - start


def test_a_rank_arriving_after_its_peers_gave_up_fails_within_build_timeout() -> None:
    # Before the arrival gate, gloo made the late rank wait 5x build_timeout_s (10 s here), or
    # return a group whose first collective failed; NCCL would wait forever.
    (early, early_s), (late, late_s) = run_ranks(_late_rank, 2, timeout=60)
    assert (early, late) == ("PeerFailure", "PeerFailure")
    assert early_s < 2 * LATE_BUILD_S
    assert late_s < LATE_BUILD_S  # the gate is closed already: it fails at once


def _just_in_time(rank: int, world_size: int, port: int) -> list[float]:
    """Three ranks arrive spread over most of the build timeout: every build passes."""
    rdzv = _rdzv(rank, port)
    time.sleep(0.4 * rank)
    g = StatelessGroup(rdzv, "spread", 0, rank, world_size, build_timeout_s=1.5)
    return g.all_reduce(torch.ones(1)).tolist()


def test_ranks_spread_within_the_build_timeout_all_pass_the_gate() -> None:
    assert run_ranks(_just_in_time, 3, timeout=60) == [[3.0]] * 3


@pytest.fixture
def rdzv() -> Rendezvous:
    r = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    yield r
    r.close()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"rank": 1, "world_size": 1}, ValueError, "rank"),
        ({"rank": -1}, ValueError, "rank"),
        ({"world_size": 0, "rank": 0}, ValueError, "world_size"),
        ({"epoch": -1}, ValueError, "epoch"),
        ({"backend": "mpi"}, ValueError, "backend"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"timeout_s": -1.0}, ValueError, "timeout_s"),
        ({"name": "a/b"}, ValueError, "without '/'"),
        ({"name": ""}, ValueError, "non-empty"),
        ({"rank": True}, TypeError, "rank"),
        ({"device": "meta"}, ValueError, "device"),
        ({"device": "nonsense"}, ValueError, "not a valid torch device"),
        ({"device": 3.5}, TypeError, "device must be"),
        ({"timeout_s": float("inf")}, ValueError, "at most"),
        ({"timeout_s": float("nan")}, ValueError, "timeout_s"),
        ({"build_timeout_s": float("inf")}, ValueError, "build_timeout_s"),
        ({"name": 7}, TypeError, "name must be a str"),
    ],
)
def test_bad_arguments(rdzv: Rendezvous, kwargs: dict, exc: type, match: str) -> None:
    args = {"name": "g", "epoch": 0, "rank": 0, "world_size": 1, **kwargs}
    with pytest.raises(exc, match=match):
        StatelessGroup(rdzv, **args)


def test_wait_for_breaks_the_group_at_its_timeout(rdzv: Rendezvous) -> None:
    g = StatelessGroup(rdzv, "waits", 0, 0, 1, timeout_s=0.2)
    polls = []
    g.wait_for(lambda: len(polls) > 2 or polls.append(1) is not None, "a wait that ends")
    assert g.failure is None
    started = time.monotonic()
    with pytest.raises(PeerFailure, match="a wait that never ends on group 'waits'"):
        g.wait_for(lambda: False, "a wait that never ends")
    assert time.monotonic() - started >= 0.2
    assert g.failure is not None
    with pytest.raises(PeerFailure, match="broken"):
        g.all_reduce(torch.zeros(1))
    g.destroy()
    assert g.closed


def test_single_rank_group_and_bad_calls(rdzv: Rendezvous) -> None:
    g = StatelessGroup(rdzv, "solo", 3, 0, 1, timeout_s=2)
    assert (g.name, g.epoch, g.rank, g.world_size, g.backend) == ("solo", 3, 0, 1, "gloo")
    assert g.all_reduce(torch.tensor([5])).item() == 5
    with pytest.raises(ValueError, match="outside the group"):
        g.broadcast(torch.zeros(1), src=1)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        g.all_reduce([1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contiguous"):
        g.all_reduce(torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="sums to"):
        g.all_to_all_single(torch.zeros(3), torch.zeros(3), [2], [3])
    with pytest.raises(ValueError, match="recvs from self"):
        g.batch_p2p([(torch.zeros(1), 0)], [])
    with pytest.raises(ValueError, match="outside the group"):
        g.prepare_p2p([(torch.zeros(1), 1)], [])
    own = torch.zeros(2)
    g.prepare_p2p([(torch.ones(2), 0)], [(own, 0)]).post().wait()
    assert own.tolist() == [1.0, 1.0]
    assert g.broadcast_object({"a": 1}) == {"a": 1}
    g.abort()
    g.abort()
    with pytest.raises(GroupClosedError):
        g.all_reduce(torch.zeros(1))
    with pytest.raises(ValueError, match="already built"):
        StatelessGroup(rdzv, "solo", 3, 0, 1, timeout_s=2)
