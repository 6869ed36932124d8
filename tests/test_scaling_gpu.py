"""Scaling over NCCL: one GPU per rank, polls on the gloo control group, weights bit for bit.

Needs CUDA and at least 2 GPUs: scales 1 -> all GPUs -> all - 1 and a rebalance at 2 ranks for
a skewed load, while every rank's "forward" runs an NCCL all-reduce on the serving group at each
step (the case that deadlocked when a background thread shared the serving stream). GPU =
member id % device count, so these sequences never put two members of one epoch on the same GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from elastic_ep.scaling import (
    ElasticCoordinator,
    LocalProcessLauncher,
    RebalanceRequest,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
)
from elastic_ep.scaling.channel import put
from elastic_ep.scaling.status import EventKind
from tests.test_scaling_e2e import EngineConfig, _infos, rank_main

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
@pytest.mark.timeout(300)
@pytest.mark.parametrize("transfer_in_poll", [True, False])
def test_nccl_scale_up_and_down(transfer_in_poll: bool) -> None:
    """The forward's NCCL all-reduce runs at every step while the scale stages: with the transfer
    at one lockstep poll (the NCCL default), or on the staging thread's own CUDA stream."""
    gpus = torch.cuda.device_count()
    cfg = EngineConfig(
        layers=2, experts=4, slots=4, backend="nccl", transfer_in_poll=transfer_in_poll
    )
    coord = ElasticCoordinator(
        LocalProcessLauncher(rank_main, start_method="spawn"),
        ScaleLimits(4, 4, 4 * gpus),
        config=cfg,
        timeout_s=30.0,
    )
    try:
        status = coord.start(1, timeout_s=120)
        _infos(coord, status)
        status = coord.scale(ScaleRequest(world_size=gpus, timeout_s=120))  # members 0..gpus-1
        assert status.phase is ScalePhase.COMPLETED, status
        _infos(coord, status)
        status = coord.scale(ScaleRequest(world_size=gpus - 1, timeout_s=120))
        assert status.phase is ScalePhase.COMPLETED, status
        _infos(coord, status)
        print(
            "\nnccl scale",
            gpus,
            "->",
            gpus - 1,
            "phases",
            status.phase_s,
            "blocking_s",
            status.blocking_s,
        )
    finally:
        coord.shutdown()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
@pytest.mark.timeout(300)
def test_nccl_rebalance_moves_experts_bit_exact() -> None:
    cfg = EngineConfig(layers=2, experts=8, slots=6, backend="nccl")
    coord = ElasticCoordinator(
        LocalProcessLauncher(rank_main, start_method="spawn"),
        ScaleLimits(8, 6, 12),
        config=cfg,
        timeout_s=30.0,
    )
    try:
        start = coord.start(2, timeout_s=120)
        _infos(coord, start)
        hot_last = [[1.0] * 7 + [20.0]] * cfg.layers  # the last expert wants more replicas
        put(coord.store, "test/load", json.dumps(hot_last).encode())
        status = coord.rebalance(RebalanceRequest(timeout_s=120))
        assert status.phase is ScalePhase.COMPLETED and status.event is EventKind.REBALANCE, status
        assert status.members == start.members and status.experts_moved, status
        _infos(coord, status)
        print(
            "\nnccl rebalance at 2 ranks: phases",
            status.phase_s,
            "blocking_s",
            status.blocking_s,
            "balance",
            status.balance_before,
            "->",
            status.balance_after,
        )
    finally:
        coord.shutdown()
