"""ElasticWorld in real processes over gloo: rebuilds 4 -> 2 -> 3 -> 4 with leavers rejoining,
standby groups, KV budget for joiners, failed reconfigure and rollback, bad input."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed as dist

from elastic_ep.errors import ReconfigureError
from elastic_ep.groups import ElasticWorld, GroupLayout, MemberState, Rendezvous
from elastic_ep.kv import sync_kv_budget
from elastic_ep.rank_mapping import RankMapping
from tests.procs import run_ranks


def _pairs(n: int) -> GroupLayout:
    return GroupLayout(n, {"pair": tuple(tuple(range(i, min(i + 2, n))) for i in range(0, n, 2))})


def _kv_bytes(member: int) -> int:
    return 5000 - 100 * (member % 10) + member


# Epochs of the rebuild test: processes 2 and 3 leave at epoch 1 and come back as members 12, 13.
_SCHEDULE = [(0, [0, 1, 2, 3]), (1, [0, 1]), (2, [0, 1, 12]), (3, [0, 1, 12, 13])]


def _world(rdzv: Rendezvous, member: int) -> ElasticWorld:
    return ElasticWorld(rdzv, member, timeout_s=10, layout=_pairs)


def _rebuilds(proc: int, world_size: int, port: int) -> list[dict[str, object]]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    world = _world(rdzv, proc)
    log: list[dict[str, object]] = []
    for epoch, members in _SCHEDULE:
        me = next((m for m in (proc, proc + 10) if m in members), None)
        entry: dict[str, object] = {"epoch": epoch}
        if epoch == 0:
            world.start(members)
        elif me is None and world.state is MemberState.OUTSIDE:
            log.append({"epoch": epoch, "outside": True})
            continue
        else:
            if me is not None and me != world.member_id:  # a process that left rejoins anew
                world.close()
                world = _world(rdzv, me)
            joiner = world.state is MemberState.OUTSIDE
            pending = world.prepare(members, epoch=epoch)
            # Standby: the new groups work while the old ones (leavers included) still do.
            if not joiner:
                entry["old_sum"] = world.group.all_reduce(torch.ones(1)).item()
            if pending.rank is not None:
                entry["kv"] = sync_kv_budget(pending.group, None if joiner else _kv_bytes(me))
            if not joiner:
                entry["old_sum_after"] = world.group.all_reduce(torch.ones(1)).item()
            entry["mapping"] = world.commit(pending)
            if world.state is MemberState.OUTSIDE:
                entry["left"] = True
                log.append(entry)
                continue
        g = world.group
        entry["rank"], entry["size"] = world.rank, world.world_size
        entry["min"] = g.all_reduce(
            torch.tensor([_kv_bytes(world.member_id)]), op=dist.ReduceOp.MIN
        ).item()
        entry["members"] = g.all_gather_object(world.member_id)
        pair = world.subgroup("pair")
        entry["pair_sum"] = pair.all_reduce(torch.tensor([world.rank])).item()
        log.append(entry)
    # Epoch numbers are never reused, not even locally by mistake.
    try:
        world.prepare([0, 1, 12, 13], epoch=3)
    except ValueError as err:
        log.append({"reuse_rejected": "never reused" in str(err)})
    world.group.barrier()
    world.close()
    return log


def test_rebuild_4_2_3_4_with_rejoin_and_kv_budget() -> None:
    logs = run_ranks(_rebuilds, 4, timeout=120)
    mappings = {
        1: RankMapping((0, 1, None, None), 2),
        2: RankMapping((0, 1), 3),
        3: RankMapping((0, 1, 2), 4),
    }
    # Every old member (leavers too) used the old group while the standby existed.
    assert sum("old_sum" in e for log in logs for e in log) == 4 + 2 + 3
    for proc, log in enumerate(logs):
        by_epoch = {e["epoch"]: e for e in log if "epoch" in e}
        assert log[-1] == {"reuse_rejected": True}
        for epoch, members in _SCHEDULE:
            e = by_epoch[epoch]
            if epoch:
                in_old = proc in _SCHEDULE[epoch - 1][1] or proc + 10 in _SCHEDULE[epoch - 1][1]
                if in_old or proc in members or proc + 10 in members:
                    assert e["mapping"] == mappings[epoch], (proc, epoch)
            if epoch and "old_sum" in e:
                assert e["old_sum"] == e["old_sum_after"] == len(_SCHEDULE[epoch - 1][1])
            if e.get("left") or e.get("outside"):
                assert proc in (2, 3) and epoch in (1, 2) and (epoch == 1 or proc == 3)
                continue
            me = proc if proc in members else proc + 10
            assert e["rank"] == members.index(me) and e["size"] == len(members)
            assert e["min"] == min(_kv_bytes(m) for m in members)
            assert e["members"] == members
            rank = members.index(me)
            partner = rank ^ 1
            assert e["pair_sum"] == rank + (partner if partner < len(members) else 0)
            if epoch:
                old_members = _SCHEDULE[epoch - 1][1]
                # Joiners learn the old members' budget; they pass None.
                assert e["kv"] == min(_kv_bytes(m) for m in old_members if m in members)


def _never_arrives(proc: int, world_size: int, port: int) -> dict[str, object]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    world = ElasticWorld(rdzv, proc, timeout_s=5, build_timeout_s=1.5)
    world.start([0, 1])
    out: dict[str, object] = {}
    start = time.monotonic()
    try:
        world.prepare([0, 1, 7], epoch=1)
    except ReconfigureError as err:
        out["elapsed"] = time.monotonic() - start
        out["error"] = str(err)
    out["old_works"] = world.group.all_reduce(torch.ones(1)).item()
    out["epoch_after_fail"] = world.epoch
    try:
        world.prepare([0, 1], epoch=1)
    except ValueError as err:
        out["retry_same_epoch"] = str(err)
    # Rollback path: a standby that is discarded leaves the current epoch in place.
    pending = world.prepare([0, 1], epoch=2)
    pending.group.barrier()
    world.discard(pending)
    out["after_discard"] = world.group.all_reduce(torch.tensor([proc])).item()
    mapping = world.reconfigure([1, 0], epoch=3)
    out["mapping"] = mapping
    out["rank"] = world.rank
    out["new_works"] = world.group.all_reduce(torch.tensor([world.rank * 10])).item()
    world.close()
    return out


def test_member_never_arrives_then_next_reconfigure_works() -> None:
    outs = run_ranks(_never_arrives, 2, timeout=60)
    for proc, out in enumerate(outs):
        assert 1.4 < out["elapsed"] < 4.0, out
        assert "member 7 missing" in out["error"] and "epoch 1" in out["error"]
        assert out["old_works"] == 2.0 and out["epoch_after_fail"] == 0
        assert "never reused" in out["retry_same_epoch"]
        assert out["after_discard"] == 1
        assert out["mapping"] == RankMapping((1, 0), 2)
        assert out["rank"] == 1 - proc
        assert out["new_works"] == 10


@pytest.fixture
def solo() -> ElasticWorld:
    rdzv = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    world = ElasticWorld(rdzv, 5, timeout_s=2)
    yield world
    world.close()
    rdzv.close()


def test_bad_input_leaves_state_intact(solo: ElasticWorld) -> None:
    with pytest.raises(ValueError, match="not in new_members"):
        solo.start([1])
    with pytest.raises(ValueError, match="members is empty"):
        solo.start([])
    solo.start([5], epoch=4)
    for members, epoch, exc, match in [
        ([5, 5], 5, ValueError, "duplicate"),
        ([5], -1, ValueError, "epoch must be >= 0"),
        ([5], 4, ValueError, "greater than 4"),
        ([5], 2.5, TypeError, "epoch must be an int"),
        ([5, True], 5, TypeError, "int member ids"),
        ([5, -2], 5, ValueError, ">= 0"),
        ("5", 5, TypeError, "sequence"),
    ]:
        with pytest.raises(exc, match=match):
            solo.prepare(members, epoch=epoch)  # type: ignore[arg-type]
    assert (solo.epoch, solo.members, solo.rank) == (4, (5,), 0)
    with pytest.raises(ValueError, match="already started"):
        solo.start([5], epoch=9)
    assert solo.reconfigure([5], epoch=5) == RankMapping.identity(1)
    assert solo.group.all_reduce(torch.tensor([3])).item() == 3
    with pytest.raises(ValueError, match="no partition"):
        solo.subgroup("tp")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"member_id": -1}, ValueError, "member_id"),
        ({"timeout_s": 0}, ValueError, "timeout_s"),
        ({"build_timeout_s": -1}, ValueError, "build_timeout_s"),
        ({"backend": "tcp"}, ValueError, "backend"),
        ({"name": "a/b"}, ValueError, "'/'"),
        ({"name": 3}, TypeError, "name must be a str"),
        ({"timeout_s": float("inf")}, ValueError, "at most"),
        ({"device": "nonsense"}, ValueError, "not a valid torch device"),
    ],
)
def test_bad_world_arguments(kwargs: dict, exc: type, match: str) -> None:
    rdzv = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    args = {"member_id": 0, **kwargs}
    member = args.pop("member_id")
    with pytest.raises(exc, match=match):
        ElasticWorld(rdzv, member, **args)
    rdzv.close()


def test_layout_validation() -> None:
    assert GroupLayout.blocks(4, tp=2).partitions["tp"] == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match="does not divide"):
        GroupLayout.blocks(3, tp=2)
    with pytest.raises(ValueError, match="exactly once"):
        GroupLayout(3, {"x": ((0, 1), (1, 2))})
    with pytest.raises(ValueError, match="empty group"):
        GroupLayout(1, {"x": ((0,), ())})


def _background_standby(proc: int, world_size: int, port: int) -> dict[str, object]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)
    old_members, new_members = [0, 1, 2], [0, 1, 2, 3]
    world = ElasticWorld(rdzv, proc, timeout_s=10)
    if proc == 3:  # the joiner arrives late, so the others' standby build is still waiting
        time.sleep(0.8)
        world.commit(world.prepare(new_members, epoch=1))
        return {"sum": world.group.all_reduce(torch.ones(1)).item()}
    world.start(old_members)
    built: list[object] = []
    builder = threading.Thread(target=lambda: built.append(world.prepare(new_members, epoch=1)))
    builder.start()
    overlapped, sums = 0, []
    for _ in range(20):  # the old epoch keeps serving while the next one is being built
        overlapped += builder.is_alive()
        sums.append(world.group.all_reduce(torch.ones(1)).item())
        time.sleep(0.01)
    builder.join(30)
    world.commit(built[0])  # type: ignore[arg-type]
    out = {"sum": world.group.all_reduce(torch.ones(1)).item(), "old": sums, "overlap": overlapped}
    world.close()
    return out


def test_standby_built_in_background_while_old_epoch_serves() -> None:
    outs = run_ranks(_background_standby, 4, timeout=60)
    assert all(out["sum"] == 4.0 for out in outs)
    for out in outs[:3]:
        assert out["old"] == [3.0] * 20
        assert out["overlap"] >= 1
