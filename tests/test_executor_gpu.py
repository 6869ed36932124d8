"""execute (and prepare_execution + run) over NCCL on 2 GPUs: bit-exact after every kind of
scale event, within the buffer, with the multi-tensor (torch), the fused Triton and the
copy-engine paths."""

from __future__ import annotations

import random

import pytest
import torch

from elastic_ep.eplb import execute, plan_transfers, required_buffer_bytes
from elastic_ep.eplb.copy_engine import engine_available
from elastic_ep.eplb.row_copy import triton_available
from elastic_ep.groups import Rendezvous, StatelessGroup
from tests.procs import run_ranks
from tests.test_executor import (
    _checked_then_run,
    _prepared_then_run,
    _ranks_of,
    check_after,
    expert_weights,
    initial_weights,
    peer_dies_mid_run,
)
from tests.test_transfer_plan import KINDS, make_scenario

pytestmark = pytest.mark.gpu

ALLOCATOR_SLACK = 64 << 10  # the plan check's small collective, rounded to allocator blocks


def _nccl_scenarios(
    rank: int, world_size: int, port: int, seed: int, copy: str
) -> list[tuple[str, int]]:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    group = StatelessGroup(rdzv, "eplb-gpu", 0, rank, world_size, "nccl", device, timeout_s=60)
    rng = random.Random(seed)
    out = []
    for kind in KINDS:
        sc = make_scenario(kind, rng.randrange(2**31), world_size, 3, 10)
        old, new = _ranks_of(sc, rank)
        plan = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
        before = initial_weights(sc, old, new, tag=rank)
        budget = required_buffer_bytes(plan, before, world_size) * rng.choice([1, 2, 100])
        weights = [[t.to(device) for t in layer] for layer in before]
        truth = {(r.layer, r.expert): expert_weights(r.layer, r.expert) for r in plan.reloads}
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        # Both ranks draw the same: execute, or prepare_execution then run (checked ahead or not).
        run = rng.choice([execute, _prepared_then_run, _checked_then_run])
        stats = run(
            plan,
            weights,
            group,
            buffer_bytes=budget,
            reload=lambda lay, exp, truth=truth: truth[(lay, exp)],
            overlap=rng.random() < 0.7,
            copy=copy,
        )
        peak = torch.cuda.max_memory_allocated(device) - base
        check_after(sc, new, before, [[t.cpu() for t in layer] for layer in weights])
        assert stats.peak_extra_bytes <= budget
        assert peak <= budget + ALLOCATOR_SLACK, (kind, peak, budget)
        out.append((kind, stats.num_chunks))
    group.barrier()
    group.destroy()
    return out


def _skip_if_missing(copy: str) -> None:
    if copy == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    if copy == "engine" and not engine_available(torch.device("cuda", 0)):
        pytest.skip("the CUDA runtime has no cudaMemcpyBatchAsync (needs 12.8)")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
@pytest.mark.parametrize("copy", ["torch", "triton", "engine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_nccl_bit_exact(seed: int, copy: str) -> None:
    _skip_if_missing(copy)
    results = run_ranks(_nccl_scenarios, 2, seed, copy, timeout=180)
    assert results[0] == results[1]


def _one_gpu_local_moves(rank: int, world_size: int, port: int, copy: str) -> list[int]:
    """A one-rank NCCL group: reshuffles and drifts within the GPU (slot-to-slot and staged
    copies, no transfers), bit for bit."""
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    group = StatelessGroup(rdzv, "eplb-1gpu", 0, 0, 1, "nccl", device, timeout_s=60)
    rng = random.Random(7)
    chunks = []
    for kind in ("reshuffle", "drift") * 3:
        sc = make_scenario(kind, rng.randrange(2**31), 1, 3, 10)
        plan = plan_transfers(sc.previous, sc.new, sc.mapping)
        before = initial_weights(sc, 0, 0, tag=0)
        budget = required_buffer_bytes(plan, before, 1) * rng.choice([1, 2, 100])
        weights = [[t.to(device) for t in layer] for layer in before]
        run = rng.choice([execute, _prepared_then_run, _checked_then_run])
        stats = run(
            plan, weights, group, buffer_bytes=budget, overlap=rng.random() < 0.7, copy=copy
        )
        check_after(sc, 0, before, [[t.cpu() for t in layer] for layer in weights])
        chunks.append(stats.num_chunks)
    group.destroy()
    return chunks


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("copy", ["torch", "triton", "engine"])
def test_one_gpu_local_moves_bit_exact(copy: str) -> None:
    _skip_if_missing(copy)
    (chunks,) = run_ranks(_one_gpu_local_moves, 1, copy, timeout=180)
    assert len(chunks) == 6 and all(c >= 1 for c in chunks)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)
def test_nccl_peer_dying_mid_run_raises_peer_failure() -> None:
    """Over NCCL a transfer that waits for a dead peer ends without an error on the stream once
    torch's watchdog aborts it: execute must still raise, within the timeout."""
    survivor, _ = run_ranks(peer_dies_mid_run, 2, "nccl", 5.0, timeout=120, expect_dead=[1])
    assert survivor < 2 * 5.0
