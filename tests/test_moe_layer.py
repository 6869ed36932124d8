"""The EP MoE layer over real processes (gloo): output equals the single-process reference for
random placements (replicas, empty slots), before and after each scale event; a dead peer or an
aborted group under dispatch/combine raises PeerFailure / GroupClosedError."""

from __future__ import annotations

import os
import time

import torch
from torch.distributed import AllToAllOptions

from elastic_ep.eplb import Placement, PlacementBuffers
from elastic_ep.eplb.executor import execute
from elastic_ep.eplb.transfer_plan import plan_transfers
from elastic_ep.errors import PeerFailure
from elastic_ep.groups import GroupClosedError, Rendezvous, StatelessGroup
from elastic_ep.moe import (
    DISPATCH_RESOURCE,
    AllToAllBackend,
    EPMoEModel,
    LoadRecord,
    MoEModelConfig,
    build_local_model,
    reference_forward,
    reference_moe,
    register_dispatch_backend,
    seeded_expert,
    seeded_gate,
    topk_gating,
)
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling.resources import EpochContext, EpochResources
from tests.procs import run_ranks
from tests.test_routing import random_placement

CONFIG = MoEModelConfig(
    num_layers=2, num_experts=16, hidden_size=32, intermediate_size=16, top_k=2, seed=7
)
PER_RANK = 9  # 2 ranks -> 18 slots, 4 ranks -> 36 slots (many replicas and empty slots)
TIMEOUT_S = 20.0
ATOL = 2e-5


def _tokens(epoch: int, rank: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * epoch + rank)
    return torch.randn(count, CONFIG.hidden_size, generator=gen)


def _expected_loads(hidden: torch.Tensor) -> torch.Tensor:
    """float32 [L, E]: top-k picks per logical expert of each layer, from the reference."""
    loads = torch.zeros(CONFIG.num_layers, CONFIG.num_experts)
    x = hidden
    for layer in range(CONFIG.num_layers):
        gate = seeded_gate(CONFIG, layer)
        _, ids = topk_gating(x, gate, CONFIG.top_k)
        loads[layer] = torch.bincount(ids.reshape(-1), minlength=CONFIG.num_experts).float()
        experts = [seeded_expert(CONFIG, layer, e) for e in range(CONFIG.num_experts)]
        x = x + reference_moe(
            x,
            gate,
            torch.stack([w[0] for w in experts]),
            torch.stack([w[1] for w in experts]),
            CONFIG.top_k,
        )
    return loads


def _check_forward(model: EPMoEModel, epoch: int, rank: int, count: int) -> float:
    """Run one step; return the max abs error against the reference."""
    hidden = _tokens(epoch, rank, count)
    out = model(hidden)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    return float((out - reference_forward(CONFIG, hidden)).abs().max()) if count else 0.0


def _scale_rank(rank: int, world_size: int, port: int) -> dict:
    """Epochs: 2 ranks -> 4 (scale up) -> 3 (scale down) -> 2 (rank 2 dies; reload)."""
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    gen = torch.Generator().manual_seed(42)  # same placements on every rank
    worlds = [2, 4, 3, 2]
    placements = [
        random_placement(gen, CONFIG.num_layers, CONFIG.num_experts, w, PER_RANK) for w in worlds
    ]
    buffers = PlacementBuffers(
        CONFIG.num_layers, CONFIG.num_experts, 4 * PER_RANK / CONFIG.num_experts
    )
    record = LoadRecord(CONFIG.num_layers, CONFIG.num_experts, buffers.capacity, window=8)
    resources = EpochResources()
    register_dispatch_backend(resources)
    start = (
        placements[0]
        if rank < 2
        else Placement.empty(CONFIG.num_layers, CONFIG.num_experts, 4, PER_RANK)
    )
    model = build_local_model(CONFIG, start, rank, buffers, load_record=record)
    groups: dict[int, StatelessGroup] = {}

    def commit(epoch: int, my_rank: int | None) -> None:
        buffers.update_(placements[epoch])
        if my_rank is None:
            model.set_backend(None)
            return
        ctx = EpochContext(epoch, my_rank, worlds[epoch], groups[epoch], placements[epoch])
        old = resources.install(resources.build(ctx))
        if old is not None:
            old.teardown()
        model.set_backend(resources.get(DISPATCH_RESOURCE))

    def step(epoch: int, my_rank: int) -> None:
        count = (
            0 if (epoch, my_rank) == (1, 1) else 3 + 4 * my_rank + epoch
        )  # a rank with no tokens
        report["errors"].append(_check_forward(model, epoch, my_rank, count))
        expected = _expected_loads(_tokens(epoch, my_rank, count))
        assert torch.equal(record.step_counts.float(), expected), "load record != reference top-k"
        record.end_step()
        report["local"][epoch] = record.logical_load().tolist()
        report["aggregate"][epoch] = record.aggregate(groups[epoch]).tolist()

    report: dict = {"errors": [], "local": {}, "aggregate": {}}
    # Epoch 0: ranks 0, 1 serve; 2 and 3 are joiners waiting.
    if rank < 2:
        groups[0] = StatelessGroup(rdzv, "ep", 0, rank, 2, timeout_s=TIMEOUT_S)
        commit(0, rank)
        step(0, rank)
    # Scale up 2 -> 4: transfer on the new group (new numbering), joiners only receive.
    groups[1] = StatelessGroup(rdzv, "ep", 1, rank, 4, timeout_s=TIMEOUT_S)
    up = plan_transfers(placements[0], placements[1], RankMapping.resize(2, 4))
    execute(up, model.expert_weights(), groups[1], buffer_bytes=1 << 20)
    if rank < 2:
        groups.pop(0).destroy()
    commit(1, rank)
    step(1, rank)
    # Scale down 4 -> 3: leavers hand off first, on the old group (old numbering).
    down = plan_transfers(placements[1], placements[2], RankMapping.resize(4, 3))
    execute(down, model.expert_weights(), groups[1], buffer_bytes=1 << 20)
    groups.pop(1).destroy()
    if rank == 3:
        commit(2, None)
        return report
    groups[2] = StatelessGroup(rdzv, "ep", 2, rank, 3, timeout_s=TIMEOUT_S)
    commit(2, rank)
    step(2, rank)
    # Rank 2 dies: survivors rebuild with 2 ranks and reload experts that only rank 2 held.
    if rank == 2:
        return report
    groups.pop(2).abort()
    groups[3] = StatelessGroup(rdzv, "ep", 3, rank, 2, timeout_s=TIMEOUT_S)
    failover = plan_transfers(
        placements[2], placements[3], RankMapping.without(3, [2]), dead_ranks=[2]
    )
    stats = execute(
        failover,
        model.expert_weights(),
        groups[3],
        buffer_bytes=1 << 20,
        reload=model.reload,
    )
    report["reloaded"] = len(stats.reloaded)
    commit(3, rank)
    step(3, rank)
    groups[3].barrier()  # rank 0 hosts the store: it leaves last
    groups.pop(3).destroy()
    return report


def test_output_equals_reference_before_and_after_each_scale() -> None:
    reports = run_ranks(_scale_rank, 4, timeout=120)
    members = {0: [0, 1], 1: [0, 1, 2, 3], 2: [0, 1, 2], 3: [0, 1]}
    assert reports[0]["reloaded"] + reports[1]["reloaded"] > 0  # the failover exercised reload
    for rank, report in enumerate(reports):
        assert len(report["errors"]) == sum(rank in m for m in members.values())
        assert max(report["errors"]) < ATOL, (rank, report["errors"])
    for epoch, ranks in members.items():
        expected = torch.tensor([reports[r]["local"][epoch] for r in ranks]).sum(0)
        for r in ranks:
            assert torch.equal(torch.tensor(reports[r]["aggregate"][epoch]), expected)


def _random_placements_rank(rank: int, world_size: int, port: int) -> list[float]:
    """One group; several random placements (replicas, even on one rank, and empty slots) and
    slot counts per rank; each rank's model rebuilt from (placement, rank)."""
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    group = StatelessGroup(rdzv, "ep", 0, rank, world_size, timeout_s=TIMEOUT_S)
    gen = torch.Generator().manual_seed(3)
    buffers = PlacementBuffers(CONFIG.num_layers, CONFIG.num_experts, 3.0)
    errors = []
    for trial, per_rank in enumerate([6, 7, 9, 12, 16]):
        placement = random_placement(
            gen,
            CONFIG.num_layers,
            CONFIG.num_experts,
            world_size,
            per_rank,
            empty_p=0.2 * (trial % 3),
        )
        buffers.update_(placement)
        model = build_local_model(CONFIG, placement, rank, buffers)
        model.set_backend(AllToAllBackend.build(group, per_rank))
        errors.append(_check_forward(model, 10 + trial, rank, 5 + 3 * rank + trial))
    group.barrier()
    group.destroy()
    return errors


def test_output_equals_reference_for_random_placements() -> None:
    for errors in run_ranks(_random_placements_rank, 3, timeout=90):
        assert len(errors) == 5 and max(errors) < ATOL, errors


def _bad_dispatch_rank(rank: int, world_size: int, port: int) -> list[str]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    group = StatelessGroup(rdzv, "ep", 0, rank, world_size, timeout_s=TIMEOUT_S)
    backend = AllToAllBackend.build(group, 2)
    hidden = torch.randn(3, 4)
    weights = torch.ones(3, 1)
    messages = []
    for bad in (torch.tensor([[0], [4], [1]]), torch.tensor([[0], [1], [2]], dtype=torch.int32)):
        try:
            backend.dispatch(hidden, bad, weights)
        except ValueError as err:
            messages.append(str(err))
    # Nothing was exchanged: the group still works, and a good dispatch + combine does too.
    tokens, handle = backend.dispatch(hidden, torch.tensor([[0], [3], [-1]]), weights)
    try:
        backend.combine(tokens.hidden[:0] if tokens.hidden.shape[0] else torch.zeros(1, 4), handle)
    except ValueError as err:
        messages.append(str(err))
    out = backend.combine(tokens.hidden * 2, handle)
    assert torch.equal(out, torch.cat([2 * hidden[:2], torch.zeros(1, 4)]))
    backend.destroy()
    try:
        backend.dispatch(hidden, torch.tensor([[0], [3], [-1]]), weights)
    except RuntimeError as err:
        messages.append(str(err))
    group.barrier()
    group.destroy()
    return messages


def test_bad_dispatch_raises_before_any_collective() -> None:
    for messages in run_ranks(_bad_dispatch_rank, 2, timeout=60):
        assert len(messages) == 4, messages
        assert "slot ids are >= 4" in messages[0]
        assert "slot_ids must be int64" in messages[1]
        assert "expert_output must be" in messages[2]
        assert "destroyed" in messages[3]


class _RawGroup:
    """An ``AllToAllGroup`` straight on torch's gloo ProcessGroup: its errors are torch's bare
    ``RuntimeError`` s (a ``StatelessGroup`` would already map them), so the backend's own mapping
    is what the test sees."""

    def __init__(self, group: StatelessGroup) -> None:
        self._pg = group.process_group
        self.rank, self.world_size = group.rank, group.world_size
        self.name, self.epoch, self.closed = "raw", group.epoch, False

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor:
        opts = AllToAllOptions()
        self._pg.alltoall_base(
            output, input, output_split_sizes or [], input_split_sizes or [], opts
        ).wait()
        return output


def _failing_peer_rank(rank: int, world_size: int, port: int) -> dict:
    """Round 1: a group aborted before dispatch and before combine -> GroupClosedError. Round 2
    (raw gloo group): rank 1 dies after a dispatch, rank 0's combine -> PeerFailure; rank 0's
    next dispatch on the broken group -> PeerFailure too."""
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    hidden = torch.randn(4, 8)
    slots = torch.tensor([[0], [1], [2], [3]])  # 2 slots a rank: rows go to both ranks
    weights = torch.ones(4, 1)
    got: dict = {}
    aborted = StatelessGroup(rdzv, "ep", 0, rank, world_size, timeout_s=TIMEOUT_S)
    backend = AllToAllBackend.build(aborted, 2)
    tokens, handle = backend.dispatch(hidden, slots, weights)
    aborted.abort()  # e.g. the scaling watcher, after the coordinator marked a member dead
    for name, call in (
        ("combine", lambda: backend.combine(tokens.hidden, handle)),
        ("dispatch", lambda: backend.dispatch(hidden, slots, weights)),
    ):
        try:
            call()
        except GroupClosedError as err:
            got[f"closed_{name}"] = str(err)
    group = StatelessGroup(rdzv, "ep", 1, rank, world_size, timeout_s=TIMEOUT_S)
    raw = AllToAllBackend.build(_RawGroup(group), 2)
    tokens, handle = raw.dispatch(hidden, slots, weights)
    group.barrier()
    if rank == 1:
        os._exit(0)  # dies between dispatch and combine (its sockets close)
    began = time.monotonic()
    for name, call in (
        ("combine", lambda: raw.combine(tokens.hidden, handle)),
        ("dispatch", lambda: raw.dispatch(hidden, slots, weights)),
    ):
        try:
            call()
        except PeerFailure as err:
            got[f"peer_{name}"] = (err.group, err.epoch, str(err))
    got["detect_s"] = time.monotonic() - began
    group.abort()
    return got


def test_dead_peer_or_aborted_group_raise_peer_failure_or_group_closed() -> None:
    got = run_ranks(_failing_peer_rank, 2, timeout=60, expect_dead=[1])[0]
    assert "'ep' epoch 0" in got["closed_combine"] and "closed" in got["closed_dispatch"], got
    for name in ("combine", "dispatch"):
        group, epoch, message = got[f"peer_{name}"]
        assert (group, epoch) == ("raw", 1) and f"{name} on group 'raw' epoch 1" in message, got
    assert got["detect_s"] < TIMEOUT_S / 2, got  # the dead peer's closed sockets, not a timeout
