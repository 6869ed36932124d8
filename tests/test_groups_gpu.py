"""StatelessGroup and ElasticWorld over NCCL, one process per GPU (skipped without 2 GPUs)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import ElasticWorld, MemberState, Rendezvous, StatelessGroup
from elastic_ep.kv import sync_kv_budget
from tests.procs import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="needs CUDA and at least 2 GPUs",
    ),
]


def _gpus() -> int:
    return min(4, torch.cuda.device_count())


def _setup(rank: int, port: int) -> tuple[Rendezvous, torch.device]:
    torch.cuda.set_device(rank)
    return Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60), torch.device("cuda", rank)


def _nccl_ops(rank: int, n: int, port: int) -> dict[str, object]:
    rdzv, dev = _setup(rank, port)
    out: dict[str, object] = {}
    start = time.monotonic()
    g = StatelessGroup(rdzv, "nccl", 0, rank, n, "nccl", timeout_s=30)
    out["build_s"] = time.monotonic() - start
    out["sum"] = g.all_reduce(torch.full((4,), rank + 1.0, device=dev)).tolist()
    pending = torch.full((2,), float(rank), device=dev)
    reduced = g.all_reduce(pending, async_op=True)
    reduced.wait()
    arrived = torch.cuda.Event()
    arrived.record()
    g.wait_for(arrived.query, "the async all_reduce")
    reduced.raise_if_failed()
    out["async_sum"] = pending.tolist()
    t = torch.ones(3, device=dev)
    dist.all_reduce(t, group=g.process_group)
    out["torch_sum"] = t.tolist()
    out["bcast"] = g.broadcast(torch.full((2,), float(rank), device=dev), src=n - 1).tolist()
    out["objects"] = g.all_gather_object(("r", rank))
    out["bobj"] = g.broadcast_object({"k": rank} if rank == 0 else None)
    in_splits = [(rank + j) % 3 for j in range(n)]
    out_splits = [(j + rank) % 3 for j in range(n)]
    inp = torch.tensor(
        [rank * 100 + j * 10 + k for j in range(n) for k in range(in_splits[j])],
        dtype=torch.int64,
        device=dev,
    )
    outp = torch.full((sum(out_splits),), -1, dtype=torch.int64, device=dev)
    out["a2a"] = g.all_to_all_single(outp, inp, out_splits, in_splits).tolist()
    right, left = (rank + 1) % n, (rank - 1) % n
    a, b, own = (torch.zeros(1 << 20, device=dev) for _ in range(3))
    g.batch_p2p(
        [
            (torch.full((1 << 20,), float(rank), device=dev), right),
            (torch.ones(1 << 20, device=dev) * 7, rank),
        ],
        [(a, left), (own, rank)],
    )
    handle = g.batch_p2p(
        [(torch.full((1 << 20,), rank * 2.0, device=dev), left)], [(b, right)], async_op=True
    )
    assert handle is not None
    handle.wait()
    torch.cuda.synchronize()
    out["ring"] = (a[0].item(), a[-1].item(), own[0].item(), b[0].item())
    # Rebuild: the next epoch's group while the old one is still alive and used.
    start = time.monotonic()
    g2 = StatelessGroup(rdzv, "nccl", 1, n - 1 - rank, n, "nccl", timeout_s=30)
    out["rebuild_s"] = time.monotonic() - start
    out["old_still"] = g.all_reduce(torch.ones(1, device=dev)).item()
    out["new_sum"] = g2.all_reduce(torch.tensor([float(g2.rank)], device=dev)).item()
    start = time.monotonic()
    g.destroy()
    out["destroy_s"] = time.monotonic() - start
    g2.barrier()
    start = time.monotonic()
    g2.abort()
    out["abort_s"] = time.monotonic() - start
    return out


def test_nccl_collectives_p2p_rebuild_abort() -> None:
    n = _gpus()
    outs = run_ranks(_nccl_ops, n, timeout=240)
    total = n * (n + 1) / 2
    for rank, out in enumerate(outs):
        assert out["sum"] == [total] * 4
        assert out["torch_sum"] == [float(n)] * 3
        assert out["bcast"] == [float(n - 1)] * 2
        assert out["objects"] == [("r", r) for r in range(n)]
        assert out["bobj"] == {"k": 0}
        assert out["a2a"] == [
            j * 100 + rank * 10 + k for j in range(n) for k in range((j + rank) % 3)
        ]
        assert out["async_sum"] == [n * (n - 1) / 2] * 2
        left, right = (rank - 1) % n, (rank + 1) % n
        assert out["ring"] == (float(left), float(left), 7.0, right * 2.0)
        assert out["old_still"] == n and out["new_sum"] == n * (n - 1) / 2
        assert out["abort_s"] < 10


def _nccl_world(rank: int, n: int, port: int) -> list[object]:
    rdzv, _ = _setup(rank, port)
    log: list[object] = []
    world = ElasticWorld(rdzv, rank, backend="nccl", timeout_s=30)
    world.start(list(range(n)))
    log.append(sync_kv_budget(world.group, 1000 + rank))
    small = list(range(n - 1))  # the last rank leaves ...
    pending = world.prepare(small, epoch=1)
    if pending.rank is not None:
        log.append(sync_kv_budget(pending.group, 2000 + rank))
    log.append(world.commit(pending).old_to_new)
    if rank == n - 1:
        assert world.state is MemberState.OUTSIDE
        world.close()
        world = ElasticWorld(rdzv, 10 + rank, backend="nccl", timeout_s=30)  # ... and rejoins
    members = [*small, 10 + n - 1]
    pending = world.prepare(members, epoch=2)
    log.append(sync_kv_budget(pending.group, None if rank == n - 1 else 3000 + rank))
    log.append(world.commit(pending).old_to_new)
    log.append(world.group.all_reduce(torch.ones(1, device="cuda")).item())
    world.group.barrier()
    world.close()
    return log


def test_nccl_world_shrink_and_rejoin() -> None:
    n = _gpus()
    logs = run_ranks(_nccl_world, n, timeout=240)
    shrink = (*range(n - 1), None)
    grow = tuple(range(n - 1))
    for rank, log in enumerate(logs):
        if rank == n - 1:
            assert log == [1000, shrink, 3000, grow, float(n)]
        else:
            assert log == [1000, 2000, shrink, 3000, grow, float(n)]


def _nccl_kill(rank: int, n: int, port: int) -> dict[str, float]:
    rdzv, dev = _setup(rank, port)
    world = ElasticWorld(rdzv, rank, backend="nccl", timeout_s=5, build_timeout_s=30)
    world.start(list(range(n)))
    world.group.barrier()
    if rank == n - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)
    start = time.monotonic()
    try:
        world.group.all_reduce(torch.ones(1 << 10, device=dev))
        world.group.barrier()  # NCCL work is stream-ordered: the failure shows at a sync point
        raise AssertionError("no PeerFailure with a dead peer")
    except PeerFailure:
        detect = time.monotonic() - start
    start = time.monotonic()
    world.reconfigure(list(range(n - 1)), epoch=1)
    rebuild = time.monotonic() - start
    total = world.group.all_reduce(torch.ones(1, device=dev)).item()
    world.group.barrier()
    start = time.monotonic()
    world.close()
    return {
        "detect_s": detect,
        "rebuild_s": rebuild,
        "total": total,
        "close_s": time.monotonic() - start,
    }


def test_nccl_dead_peer_then_rebuild_with_survivors() -> None:
    n = _gpus()
    outs = run_ranks(_nccl_kill, n, timeout=240, expect_dead=[n - 1])
    for out in outs[:-1]:
        assert out["detect_s"] < 2 * 5
        assert out["total"] == n - 1
