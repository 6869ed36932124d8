"""The EP MoE layer over NCCL, one process per GPU, and the routing kernel on CUDA (skipped
without CUDA devices)."""

from __future__ import annotations

import pytest
import torch

from elastic_ep.eplb import Placement, PlacementBuffers, execute, plan_transfers
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.moe import (
    AllToAllBackend,
    LoadRecord,
    MoEModelConfig,
    build_local_model,
    reference_forward,
    route_to_slots,
)
from elastic_ep.moe import route_kernel as rk
from elastic_ep.rank_mapping import RankMapping
from tests.procs import run_ranks
from tests.test_routing import random_placement

pytestmark = pytest.mark.gpu

CONFIG = MoEModelConfig(
    num_layers=3, num_experts=32, hidden_size=64, intermediate_size=48, top_k=2, seed=11
)
# Max |difference| relative to max |reference| (outputs are ~10): cuBLAS may sum in another
# order for other token counts; 1e-5 is ~100 fp32 ulps, 5e-6 was seen on CPU.
RTOL = 5e-5


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max() / reference.abs().max())


def _needs_gpus(count: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} CUDA devices")


def _nccl_rank(rank: int, world_size: int, port: int) -> dict:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    gen = torch.Generator().manual_seed(5)
    buffers = PlacementBuffers(CONFIG.num_layers, CONFIG.num_experts, 3.0, device=device)
    record = LoadRecord(CONFIG.num_layers, CONFIG.num_experts, buffers.capacity, 4, device=device)
    errors, addresses = [], {buffers.log2phy.data_ptr(), buffers.logcnt.data_ptr()}
    # Two epochs (groups rebuilt), two placements each, slots per rank changing between epochs:
    # 48 then 80 slots per layer, within the buffers' capacity of 3 x 32 at any world size.
    for epoch, per_rank in enumerate([48 // world_size, 80 // world_size]):
        group = StatelessGroup(
            rdzv, "ep", epoch, rank, world_size, backend="nccl", device=device, timeout_s=30
        )
        backend = AllToAllBackend.build(group, per_rank)
        for trial in range(2):
            placement = random_placement(
                gen, CONFIG.num_layers, CONFIG.num_experts, world_size, per_rank
            )
            buffers.update_(placement)
            model = build_local_model(
                CONFIG, placement, rank, buffers, load_record=record, device=device
            )
            model.set_backend(backend)
            tokens = torch.Generator().manual_seed(100 * epoch + 10 * trial + rank)
            hidden = torch.randn(16 + 8 * rank, CONFIG.hidden_size, generator=tokens).to(device)
            out = model(hidden)
            errors.append(_relative_error(out, reference_forward(CONFIG, hidden)))
            record.end_step()
        total = record.aggregate(group)
        addresses |= {buffers.log2phy.data_ptr(), buffers.logcnt.data_ptr()}
        backend.destroy()
        group.barrier()
        group.destroy()
    torch.cuda.synchronize()
    return {"errors": errors, "total": float(total.sum()), "addresses": len(addresses)}


@pytest.mark.timeout(240)
def test_layer_over_nccl_equals_reference() -> None:
    """1 to 4 GPUs; on CUDA the layer routes and records with the fused kernel."""
    _needs_gpus(1)
    world = min(torch.cuda.device_count(), 4)
    results = run_ranks(_nccl_rank, world, timeout=200)
    tokens = sum(16 + 8 * r for r in range(world))
    for result in results:
        assert max(result["errors"]) < RTOL, result["errors"]
        # Window of 4 steps x layers x top-2 picks of every rank's tokens.
        assert result["total"] == 4 * CONFIG.num_layers * CONFIG.top_k * tokens
        assert result["addresses"] == 2  # the routing tables never moved


@pytest.mark.timeout(60)
def test_routing_on_cuda_equals_cpu() -> None:
    _needs_gpus(1)
    gen = torch.Generator().manual_seed(0)
    placement = random_placement(gen, 2, 32, 4, 12)
    ids = torch.stack([torch.randperm(32, generator=gen)[:4] for _ in range(500)])
    for layer in range(2):
        cpu = route_to_slots(ids, placement.log2phy[layer], placement.logcnt[layer], rank_offset=3)
        gpu = route_to_slots(
            ids.cuda(),
            placement.log2phy[layer].cuda(),
            placement.logcnt[layer].cuda(),
            rank_offset=3,
        )
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.timeout(60)
def test_routing_and_load_record_capture_in_a_cuda_graph() -> None:
    """No host sync: routing and load counting replay from a CUDA graph, and a placement
    written in place into the fixed-address buffers is seen by the next replay."""
    _needs_gpus(1)
    gen = torch.Generator().manual_seed(1)
    buffers = PlacementBuffers(1, 32, 2.0, device="cuda")
    record = LoadRecord(1, 32, buffers.capacity, 2, device="cuda")
    first = random_placement(gen, 1, 32, 4, 12)
    second = random_placement(gen, 1, 32, 4, 16)
    buffers.update_(first)
    ids = torch.stack([torch.randperm(32, generator=gen)[:2] for _ in range(64)]).cuda()

    def route() -> torch.Tensor:
        slots = route_to_slots(ids, buffers.log2phy[0], buffers.logcnt[0], rank_offset=1)
        record.record_(0, slots, buffers.phy2log[0])
        return slots

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        route()  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    record.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route()
    record.reset()  # capture does not run the kernels, but start clean anyway
    for placement in (first, second):
        buffers.update_(placement)
        graph.replay()
        torch.cuda.synchronize()
        expected = route_to_slots(
            ids.cpu(), placement.log2phy[0], placement.logcnt[0], rank_offset=1
        )
        assert torch.equal(captured.cpu(), expected)
        record.end_step()
    picks = torch.bincount(ids.reshape(-1).cpu(), minlength=32).float()
    assert torch.equal(record.logical_load().cpu()[0], 2 * picks)


def _skewed_ids(gen: torch.Generator, tokens: int, top_k: int, experts: int) -> torch.Tensor:
    """int64 [tokens, top_k] distinct per token, drawn from skewed loads; token 0's first
    choice made every token's, so one expert is as hot as it gets."""
    probs = torch.softmax(2.0 * torch.randn(experts, generator=gen), 0)
    ids = torch.multinomial(probs.expand(tokens, -1), top_k, generator=gen)
    hot = ids[0, 0]
    ids[(ids == hot).any(1).logical_not(), 0] = hot
    return ids


def _check_routed(
    slots: torch.Tensor,
    ids: torch.Tensor,
    placement: Placement,
    offset: int,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assert ``slots`` (kernel) splits like the reference whose ordinals begin at ``start``
    (the running counters before the launch); returns the per-slot counts."""
    slots, ids = slots.cpu(), ids.cpu()
    want = route_to_slots(
        ids, placement.log2phy[0], placement.logcnt[0], rank_offset=offset, start=start
    )
    assert torch.equal(placement.phy2log[0][slots], ids)
    per_slot = torch.bincount(slots.reshape(-1), minlength=placement.num_slots)
    assert torch.equal(per_slot, torch.bincount(want.reshape(-1), minlength=placement.num_slots))
    for expert in ids.unique().tolist():
        assert set(slots[ids == expert].tolist()) == set(want[ids == expert].tolist())
    return per_slot


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "plan",
    [
        None,
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, aggregate=True),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, aggregate=True, tally=rk.Tally.ALL),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, tally=rk.Tally.EXPERTS),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, running=True),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, aggregate=True, running=True),
        rk.LaunchPlan(rk.Strategy.SORTED, 256, 8),
        rk.LaunchPlan(rk.Strategy.SORTED, 1024, 32, tally=rk.Tally.ALL),
    ],
    ids=[
        "measured",
        "pairs",
        "pairs aggregated",
        "pairs aggregated tallied",
        "pairs experts tallied",
        "pairs running",
        "pairs running aggregated",
        "sorted 256",
        "sorted 1024 tallied",
    ],
)
def test_route_kernel_on_cuda_splits_like_the_reference(plan: rk.LaunchPlan | None) -> None:
    """One and many programs, a very hot expert, int32 and int64 ids, three times each (the
    counters must be cleared by the kernel for the next launch), under each launch plan."""
    _needs_gpus(1)
    gen = torch.Generator().manual_seed(7)
    for tokens, top_k, experts in [(1, 8, 64), (8, 6, 256), (512, 8, 384), (16384, 8, 64)]:
        placement = random_placement(gen, 1, experts, 8, experts // 8 + 4)
        buffers = PlacementBuffers(1, experts, placement.num_slots / experts, device="cuda")
        buffers.update_(placement)
        record = LoadRecord(1, experts, buffers.capacity, 1, device="cuda")
        scratch = rk.new_route_scratch(experts, "cuda")
        ids = _skewed_ids(gen, tokens, top_k, experts).cuda()
        running = rk.running_counters(scratch, experts)
        for trial, dtype in enumerate([torch.int64, torch.int32, torch.int64]):
            start = running.cpu()
            slots = rk.route_and_record(
                ids.to(dtype),
                buffers.log2phy[0],
                buffers.logcnt[0],
                scratch,
                rank_offset=trial,
                slot_counts=record.slot_counts[0],
                expert_counts=record.step_counts[0],
                record_flag=record.recording,
                plan=plan,
            )
            assert slots.dtype == dtype
            per_slot = _check_routed(slots.long(), ids, placement, trial, start)
            _assert_cleared(scratch, experts)
        picks = torch.bincount(ids.reshape(-1).cpu(), minlength=experts)
        assert torch.equal(record.step_counts[0].cpu(), 3 * picks.to(torch.int32))
        assert int(record.slot_counts[0].sum()) == 3 * ids.numel()
        assert int(per_slot.sum()) == ids.numel()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "plan",
    [
        None,
        rk.LaunchPlan(rk.Strategy.SORTED, 256, 8, tally=rk.Tally.ALL),
        rk.LaunchPlan(rk.Strategy.PAIRS, 256, 8, running=True),
    ],
    ids=["measured", "sorted tallied", "pairs running"],
)
def test_route_kernel_replays_in_a_cuda_graph_after_update(plan: rk.LaunchPlan | None) -> None:
    """The kernel (each launch shape) captured once; replays follow a placement written in
    place by ``buffers.update_``, the padding count and the record flag, all on the device."""
    _needs_gpus(1)
    gen = torch.Generator().manual_seed(2)
    buffers = PlacementBuffers(1, 32, 2.0, device="cuda")
    record = LoadRecord(1, 32, buffers.capacity, 4, device="cuda")
    scratch = rk.new_route_scratch(32, "cuda")
    first = random_placement(gen, 1, 32, 4, 12)
    second = random_placement(gen, 1, 32, 4, 16)
    buffers.update_(first)
    sizes = (3, 2000, 2500)  # 12, 8000 and 10000 pairs: one program, many, many and tallied
    batches = [_skewed_ids(gen, n, 4, 32).cuda() for n in sizes]
    valid = [torch.tensor([n], device="cuda") for n in sizes]

    def route() -> list[torch.Tensor]:
        return [
            rk.route_and_record(
                ids,
                buffers.log2phy[0],
                buffers.logcnt[0],
                scratch,
                rank_offset=1,
                slot_counts=record.slot_counts[0],
                expert_counts=record.step_counts[0],
                record_flag=record.recording,
                num_tokens=n,
                plan=plan,
            )
            for ids, n in zip(batches, valid, strict=True)
        ]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        route()  # compile and warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route()
    record.reset()
    for placement, recording, real in [
        (first, True, sizes),
        (second, True, (2, 1500, 2100)),
        (second, False, sizes),
    ]:
        buffers.update_(placement)
        record.set_recording(recording)
        for n, count in zip(valid, real, strict=True):
            n.fill_(count)
        start = rk.running_counters(scratch, 32).cpu()
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.zeros(32, dtype=torch.int64)
        for slots, ids, count in zip(captured, batches, real, strict=True):
            assert bool((slots[count:] == -1).all())
            if (plan or rk.plan_launch(ids.numel(), 32)).running:
                _check_routed(slots[:count], ids[:count], placement, 1, start)
                start = start + torch.bincount(ids[:count].reshape(-1).cpu(), minlength=32)
            else:
                _check_routed(slots[:count], ids[:count], placement, 1)
            expected += torch.bincount(ids[:count].reshape(-1).cpu(), minlength=32) * recording
        assert torch.equal(record.step_counts[0].cpu(), expected.to(torch.int32))
        assert int(record.slot_counts[0].sum()) == int(expected.sum())
        record.end_step()
    _assert_cleared(scratch, 32)


def _assert_cleared(scratch: torch.Tensor, experts: int) -> None:
    """The counters that launches clear are zero (the running ones run on)."""
    assert int(scratch[: (experts + 1) * rk.COUNTER_STRIDE].abs().sum()) == 0


def _nccl_scale_rank(rank: int, world_size: int, port: int) -> list[float]:
    """1 GPU -> 2 (rank 1 joins; weights moved by the executor over NCCL) -> 1 (rank 1 leaves)."""
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=60)
    gen = torch.Generator().manual_seed(9)
    per_rank = 40
    layout = [1, 2, 1]
    places = [
        random_placement(gen, CONFIG.num_layers, CONFIG.num_experts, w, per_rank) for w in layout
    ]
    buffers = PlacementBuffers(
        CONFIG.num_layers, CONFIG.num_experts, 2 * per_rank / 32, device=device
    )
    start = (
        places[0]
        if rank == 0
        else Placement.empty(CONFIG.num_layers, CONFIG.num_experts, 2, per_rank)
    )
    model = build_local_model(CONFIG, start, rank, buffers, device=device)
    errors = []

    def serve(epoch: int, group: StatelessGroup) -> None:
        buffers.update_(places[epoch])
        model.set_backend(AllToAllBackend.build(group, per_rank))
        tokens = torch.Generator().manual_seed(10 * epoch + rank)
        hidden = torch.randn(24, CONFIG.hidden_size, generator=tokens).to(device)
        errors.append(_relative_error(model(hidden), reference_forward(CONFIG, hidden)))

    def nccl_group(epoch: int, size: int) -> StatelessGroup:
        return StatelessGroup(
            rdzv, "ep", epoch, rank, size, backend="nccl", device=device, timeout_s=60
        )

    if rank == 0:
        solo = nccl_group(0, 1)
        serve(0, solo)
    pair = nccl_group(1, 2)
    up = plan_transfers(places[0], places[1], RankMapping.resize(1, 2))
    execute(up, model.expert_weights(), pair, buffer_bytes=8 << 20)
    if rank == 0:
        solo.destroy()
    serve(1, pair)
    down = plan_transfers(places[1], places[2], RankMapping.resize(2, 1))
    execute(down, model.expert_weights(), pair, buffer_bytes=8 << 20)
    pair.barrier()
    pair.destroy()
    if rank == 0:
        solo = nccl_group(2, 1)
        serve(2, solo)
        solo.destroy()
    torch.cuda.synchronize()
    return errors


@pytest.mark.timeout(240)
def test_layer_over_nccl_before_and_after_scale() -> None:
    _needs_gpus(2)
    errors = run_ranks(_nccl_scale_rank, 2, timeout=200)
    assert len(errors[0]) == 3 and len(errors[1]) == 1
    assert max(errors[0] + errors[1]) < RTOL, errors


@pytest.mark.timeout(60)
def test_route_kernel_on_cuda_follows_routing_shares() -> None:
    """A placement with routing shares (``units``): on CUDA each slot gets exactly the tokens
    the CPU reference gives it, for one program and for many."""
    _needs_gpus(1)
    gen = torch.Generator().manual_seed(11)
    experts, ranks, slots_per_rank = 16, 8, 4
    phy2log = torch.cat([torch.arange(experts), torch.randint(0, experts, (16,), generator=gen)])
    units = torch.randint(1, 6, (phy2log.numel(),), generator=gen)
    placement = Placement(phy2log[None], experts, ranks, units=units[None])
    assert int(placement.logcnt.max()) > int(placement.replicas.max())  # shares in the rows
    buffers = PlacementBuffers(1, experts, slots_per_rank * ranks / experts, device="cuda")
    buffers.update_(placement)
    scratch = rk.new_route_scratch(experts, "cuda")
    for tokens in (7, 3000):
        ids = _skewed_ids(gen, tokens, 4, experts)
        start = rk.running_counters(scratch, experts).cpu()
        got = rk.route_and_record(
            ids.cuda(), buffers.log2phy[0], buffers.logcnt[0], scratch, rank_offset=3
        )
        if not rk.plan_launch(ids.numel(), experts).running:
            start = None
        want = route_to_slots(
            ids, placement.log2phy[0], placement.logcnt[0], rank_offset=3, start=start
        )
        capacity = placement.num_slots
        assert torch.equal(
            torch.bincount(got.reshape(-1).cpu(), minlength=capacity),
            torch.bincount(want.reshape(-1), minlength=capacity),
        )
