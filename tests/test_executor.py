"""execute: real processes over gloo; after a scale event every slot holds its expert bit for bit."""

from __future__ import annotations

import os
import random
import signal
import time
import zlib
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import Phase as HypothesisPhase
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from elastic_ep.eplb import (
    EMPTY,
    ExecutionStats,
    GroupRanks,
    LostExpertsError,
    Phase,
    Placement,
    TransferPlan,
    execute,
    plan_transfers,
    prepare_execution,
    required_buffer_bytes,
)
from elastic_ep.errors import PeerFailure
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.rank_mapping import RankMapping
from tests.procs import run_ranks
from tests.test_transfer_plan import KINDS, Scenario, make_scenario

# Three weight kinds per layer, unlike in dtype and shape (3136 bytes per slot).
WEIGHT_KINDS: tuple[tuple[torch.dtype, tuple[int, ...]], ...] = (
    (torch.float32, (16, 32)),
    (torch.bfloat16, (32, 16)),
    (torch.int8, (64,)),
)
SLOT_BYTES = sum(dt.itemsize * torch.Size(shape).numel() for dt, shape in WEIGHT_KINDS)
BOOKKEEPING_BYTES = 4096  # the plan check's small collective; everything else is the buffer


def _tensor(seed: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int64).to(dtype)


def expert_weights(layer: int, expert: int) -> list[torch.Tensor]:
    """The true weights of (layer, expert), one tensor per kind."""
    return [
        _tensor(zlib.crc32(f"w/{layer}/{expert}/{k}".encode()), dt, shape)
        for k, (dt, shape) in enumerate(WEIGHT_KINDS)
    ]


def initial_weights(
    sc: Scenario, old: int | None, new: int | None, tag: int
) -> list[list[torch.Tensor]]:
    """A process's weights before: its old experts in their slots, junk everywhere else (a joiner
    has only junk), and one spare slot past both placements."""
    slots = 1 + max(
        sc.previous.slots_per_rank if old is not None else 0,
        sc.new.slots_per_rank if new is not None else 0,
    )
    out = []
    for layer in range(sc.new.num_layers):
        held = sc.previous.local_slots(old)[layer].tolist() if old is not None else []
        tensors = []
        for k, (dt, shape) in enumerate(WEIGHT_KINDS):
            rows = [
                expert_weights(layer, held[i])[k]
                if i < len(held) and held[i] != EMPTY
                else _tensor(zlib.crc32(f"junk/{tag}/{layer}/{i}/{k}".encode()), dt, shape)
                for i in range(slots)
            ]
            tensors.append(torch.stack(rows).contiguous())
        out.append(tensors)
    return out


def check_after(
    sc: Scenario, new: int | None, before: list[list[torch.Tensor]], after: list[list[torch.Tensor]]
) -> None:
    """Every new slot holds its expert bit for bit; every other slot is untouched."""
    for layer, (b_layer, a_layer) in enumerate(zip(before, after, strict=True)):
        wanted = sc.new.local_slots(new)[layer].tolist() if new is not None else []
        for k, (b, a) in enumerate(zip(b_layer, a_layer, strict=True)):
            for i in range(a.shape[0]):
                e = wanted[i] if i < len(wanted) else EMPTY
                expected = expert_weights(layer, e)[k] if e != EMPTY else b[i]
                assert torch.equal(a[i].view(torch.uint8), expected.view(torch.uint8)), (
                    f"{sc.name}: layer {layer} kind {k} slot {i} (expert {e}) is wrong"
                )


def measured_peak(fn) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """Run ``fn()``; return its result and the peak CPU memory it allocated (torch allocator)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def _rdzv(rank: int, port: int) -> Rendezvous:
    return Rendezvous("127.0.0.1", port, is_master=False, timeout_s=30)


def _ranks_of(sc: Scenario, group_rank: int) -> tuple[int | None, int | None]:
    if sc.group == "new":
        return sc.mapping.old_rank(group_rank), group_rank
    return group_rank, sc.mapping.new_rank(group_rank)


def _prepared_then_run(
    plan: TransferPlan, weights: list[list[torch.Tensor]], group: StatelessGroup, **options: Any
) -> ExecutionStats:
    prepared = prepare_execution(plan, weights, group, **options)
    group.barrier()  # peers may still be preparing; preparing must not need them
    return prepared.run()


def _checked_then_run(
    plan: TransferPlan, weights: list[list[torch.Tensor]], group: StatelessGroup, **options: Any
) -> ExecutionStats:
    prepared = prepare_execution(plan, weights, group, **options)
    prepared.check()  # collective: the run then skips its own check
    return prepared.run()


def _run_scenarios(
    rank: int, world_size: int, port: int, specs: Sequence[tuple[str, int, int, int, int]]
) -> list[tuple[str, ExecutionStats, int, int]]:
    rdzv = _rdzv(rank, port)
    group = StatelessGroup(rdzv, "eplb", 0, rank, world_size, timeout_s=30)
    results = []
    for kind, seed, ranks, layers, experts in specs:
        sc = make_scenario(kind, seed, ranks, layers, experts)
        old, new = _ranks_of(sc, rank)
        plan = plan_transfers(sc.previous, sc.new, sc.mapping)  # dead ranks given to execute
        rng = random.Random(seed)
        before = initial_weights(sc, old, new, tag=rank)
        need = required_buffer_bytes(plan.replan(sc.dead), before, world_size)
        budget = need * rng.choice([1, 2, 3, 100])
        overlap = rng.random() < 0.7
        weights = [[t.clone() for t in layer] for layer in before]
        truth = {
            (r.layer, r.expert): expert_weights(r.layer, r.expert)
            for r in plan.replan(sc.dead).reloads
        }
        # Every rank draws the same: execute, or prepare_execution (no communication) then run,
        # with or without a check ahead.
        run = rng.choice([execute, _prepared_then_run, _checked_then_run])
        stats, peak = measured_peak(
            lambda sc=sc, plan=plan, weights=weights, budget=budget, overlap=overlap, truth=truth, run=run: (
                run(
                    plan,
                    weights,
                    group,
                    buffer_bytes=budget,
                    dead_ranks=sc.dead,
                    reload=lambda lay, exp, truth=truth: truth[(lay, exp)],
                    overlap=overlap,
                )
            )
        )
        assert 0 <= stats.first_transfer_seconds <= stats.total_seconds
        assert isinstance(stats, ExecutionStats)
        check_after(sc, new, before, weights)
        assert stats.peak_extra_bytes <= budget, (sc.name, stats.peak_extra_bytes, budget)
        # The buffer and the slot indices are real allocations (indices are counted aligned).
        assert stats.peak_extra_bytes - 256 <= peak <= stats.peak_extra_bytes + BOOKKEEPING_BYTES, (
            sc.name,
            stats.peak_extra_bytes,
            peak,
        )
        results.append((sc.name, stats, budget, need))
    group.barrier()
    group.destroy()
    return results


@pytest.mark.parametrize("world_size", [2, 3, 4])
@settings(
    max_examples=2, deadline=None, phases=[HypothesisPhase.explicit, HypothesisPhase.generate]
)  # no shrinking: each example starts processes
@given(seed=st.integers(0, 2**31))
def test_scale_events_bit_exact(world_size: int, seed: int) -> None:
    rng = random.Random(seed)
    specs = [
        (kind, rng.randrange(2**31), world_size, rng.randint(1, 3), rng.randint(3, 10))
        for kind in KINDS
    ]
    results = run_ranks(_run_scenarios, world_size, specs, timeout=120)
    for per_kind in zip(*results, strict=True):
        stats = [s for _, s, _, _ in per_kind]
        # Every rank agrees on the traffic, and it adds up.
        assert len({s.bytes_sent_per_rank for s in stats}) == 1
        assert sum(stats[0].bytes_sent_per_rank) == sum(stats[0].bytes_received_per_rank)
        assert [s.bytes_sent for s in stats] == list(stats[0].bytes_sent_per_rank)
        assert len({s.num_chunks for s in stats}) == 1
        assert all(s.phase_seconds(Phase.P2P) >= 0 for s in stats)


def _run_scenarios_interpreted_triton(
    rank: int, world_size: int, port: int, specs: Sequence[tuple[str, int, int, int, int]]
) -> list[tuple[str, ExecutionStats, int, int]]:
    """``_run_scenarios`` with execute's Triton row-table path on CPU: the kernel runs in
    Triton's interpreter (what it would run on CUDA, from the same table)."""
    from elastic_ep.eplb import executor, row_copy
    from tests.triton_interpreter import interpreted_row_copy_kernel

    row_copy._copy_rows_kernel = interpreted_row_copy_kernel()
    executor._copy_path = lambda copy, device: "triton"
    return _run_scenarios(rank, world_size, port, specs)


def test_triton_row_table_path_bit_exact_on_cpu() -> None:
    pytest.importorskip("triton")
    rng = random.Random(5)
    specs = [(kind, rng.randrange(2**31), 3, 2, rng.randint(3, 8)) for kind in KINDS]
    results = run_ranks(_run_scenarios_interpreted_triton, 3, specs, timeout=120)
    assert len({tuple(s.num_chunks for _, s, _, _ in r) for r in results}) == 1


def _fixed_scenarios(rank: int, world_size: int, port: int) -> dict[str, object]:
    """Scale 2->3 (joiner in the middle), then 3->2 (a leaver hands off), on one group each."""
    rdzv = _rdzv(rank, port)
    out: dict[str, object] = {}
    # Scale up: new group of 3; old ranks 0, 1 become new ranks 0, 2; the joiner is new rank 1.
    mapping = RankMapping.from_members([10, 11], [10, 12, 11])
    prev = Placement(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]), 4, 2)
    new = Placement(torch.tensor([[0, 1, 2, 3, 0, EMPTY], [3, 2, 1, 0, 1, 2]]), 4, 3)
    sc = Scenario("up", prev, new, mapping, (), "new")
    group = StatelessGroup(rdzv, "up", 0, rank, 3, timeout_s=30)
    old, new_rank = _ranks_of(sc, rank)
    before = initial_weights(sc, old, new_rank, tag=rank)
    weights = [[t.clone() for t in layer] for layer in before]
    stats = execute(plan_transfers(prev, new, mapping), weights, group, buffer_bytes=SLOT_BYTES * 8)
    check_after(sc, new_rank, before, weights)
    out["up"] = (stats.bytes_sent, stats.bytes_received)
    group.destroy()
    # Scale down on the old group of 3: rank 1 leaves, after handing off what only it has.
    mapping = RankMapping.without(3, [1])
    prev = Placement(torch.tensor([[0, 1, 2, 3, 4, 5]]), 6, 3)
    new = Placement(torch.tensor([[0, 1, 2, 3, 4, 5]]), 6, 2)
    sc = Scenario("down", prev, new, mapping, (), "old")
    group = StatelessGroup(rdzv, "down", 0, rank, 3, timeout_s=30)
    old, new_rank = _ranks_of(sc, rank)
    before = initial_weights(sc, old, new_rank, tag=rank)
    weights = [[t.clone() for t in layer] for layer in before]
    stats = execute(plan_transfers(prev, new, mapping), weights, group, buffer_bytes=SLOT_BYTES * 8)
    check_after(sc, new_rank, before, weights)
    out["down"] = (stats.bytes_sent, stats.bytes_received)
    group.barrier()
    group.destroy()
    return out


def test_scale_up_and_down_fixed() -> None:
    up, down = zip(
        *[(r["up"], r["down"]) for r in run_ranks(_fixed_scenarios, 3, timeout=60)], strict=True
    )
    assert up[1] == (0, 4 * SLOT_BYTES)  # joiner: layer 0 experts 2, 3; layer 1 experts 0, 1
    assert sum(s for s, _ in up) == sum(r for _, r in up)
    # Down: the leaver (old rank 1) only sends: experts 2, 3 to survivors.
    assert down[1] == (2 * SLOT_BYTES, 0)
    assert sum(r for _, r in down) == 2 * SLOT_BYTES


def _errors(rank: int, world_size: int, port: int) -> dict[str, str]:
    """Each bad call raises on every rank with nothing moved; the group stays usable."""
    rdzv = _rdzv(rank, port)
    group = StatelessGroup(rdzv, "errors", 0, rank, world_size, timeout_s=20)
    out: dict[str, str] = {}
    sc = make_scenario("reshuffle", 7, world_size, 2, 8)
    plan = plan_transfers(sc.previous, sc.new, sc.mapping)
    before = initial_weights(sc, rank, rank, tag=rank)
    weights = [[t.clone() for t in layer] for layer in before]
    need = required_buffer_bytes(plan, weights, world_size)

    def unchanged() -> bool:
        return all(
            torch.equal(a, b)
            for la, lb in zip(weights, before, strict=True)
            for a, b in zip(la, lb, strict=True)
        )

    with pytest.raises(ValueError, match="cannot hold the smallest movable unit") as err:
        execute(plan, weights, group, buffer_bytes=need - 1)
    out["small"] = str(err.value)
    assert unchanged()
    # Ranks disagree on the budget: found by the collective check, on every rank.
    with pytest.raises(ValueError, match="run different plans") as err:
        execute(plan, weights, group, buffer_bytes=need * (2 + rank))
    out["mismatch"] = str(err.value)
    assert unchanged()
    # Dead rank, no reload hook: names the lost experts.
    dead = make_scenario("dead", 3, world_size, 2, 6)
    dplan = plan_transfers(dead.previous, dead.new, dead.mapping, dead_ranks=dead.dead)
    dweights = initial_weights(dead, dead.mapping.old_rank(rank), rank, tag=rank)
    if dplan.reloads:
        with pytest.raises(LostExpertsError) as lost:
            execute(dplan, dweights, group)
        assert lost.value.experts == tuple(sorted({(r.layer, r.expert) for r in dplan.reloads}))
        out["lost"] = str(lost.value)
    # Weights too small for the slots this rank has.
    with pytest.raises(ValueError, match=r"first dim must be >= \d+ local slots"):
        execute(plan, [[t[:1] for t in layer] for layer in weights], group)
    with pytest.raises(ValueError, match="weights has 1 layers"):
        execute(plan, weights[:1], group)
    with pytest.raises(ValueError, match="copy must be one of"):
        execute(plan, weights, group, copy="cuda")
    with pytest.raises(ValueError, match="copy='triton' needs a CUDA group"):
        execute(plan, weights, group, copy="triton")
    with pytest.raises(ValueError, match="copy='engine' needs a CUDA group"):
        execute(plan, weights, group, copy="engine")
    assert unchanged()
    # Prepared with a budget the other rank does not share: the run's check finds it.
    prepared = prepare_execution(plan, weights, group, buffer_bytes=need * (2 + rank))
    with pytest.raises(ValueError, match="run different plans"):
        prepared.run()
    with pytest.raises(RuntimeError, match="already ran"):
        prepared.run()
    with pytest.raises(RuntimeError, match="already ran"):
        prepared.check()
    prepared = prepare_execution(plan, weights, group, buffer_bytes=need * (2 + rank))
    with pytest.raises(ValueError, match="run different plans"):
        prepared.check()  # ahead of the run, with the same answer
    assert unchanged()
    # And after all that the group still runs the real thing, prepared and checked, once.
    prepared = prepare_execution(plan, weights, group, buffer_bytes=need)
    prepared.check()
    with pytest.raises(RuntimeError, match="checked already"):
        prepared.check()
    stats = prepared.run()
    check_after(sc, rank, before, weights)
    with pytest.raises(RuntimeError, match="already ran"):
        prepared.run()
    out["ok"] = str(stats.num_chunks)
    group.barrier()
    group.destroy()
    return out


def test_errors_leave_weights_and_group_intact() -> None:
    results = run_ranks(_errors, 2, timeout=60)
    for r in results:
        assert "nothing was moved" in r["small"]
        assert "nothing was moved" in r["mismatch"]
        assert "reload hook" in r.get("lost", "reload hook")


def _wrong_group(rank: int, world_size: int, port: int) -> str:
    rdzv = _rdzv(rank, port)
    group = StatelessGroup(rdzv, "wrong", 0, rank, world_size, timeout_s=20)
    # 3 -> 2 scale-down run on a 2-rank group: numbered as the new epoch, the leaver is missing.
    prev = Placement(torch.tensor([[0, 1, 2, 3, 4, 5]]), 6, 3)
    new = Placement(torch.tensor([[0, 1, 2, 3, 4, 5]]), 6, 2)
    plan = plan_transfers(prev, new, RankMapping.without(3, [2]))
    with pytest.raises(ValueError, match="sender old rank 2 is not in the group") as err:
        execute(plan, [[torch.zeros(4, 2)]], group)
    group.barrier()
    group.destroy()
    return str(err.value)


def test_sender_outside_group_is_named() -> None:
    assert all("old rank 2" in r for r in run_ranks(_wrong_group, 2, timeout=60))


def test_group_ranks_defaults() -> None:
    m = RankMapping.without(3, [1])
    assert GroupRanks.for_world_size(m, 2) == GroupRanks((0, None, 1), (0, 1))
    assert GroupRanks.for_world_size(m, 3) == GroupRanks((0, 1, 2), (0, 2))
    with pytest.raises(ValueError, match="matches neither"):
        GroupRanks.for_world_size(m, 4)


def peer_dies_mid_run(
    rank: int, world_size: int, port: int, backend: str, timeout_s: float
) -> float | None:
    """A 'dead'-kind plan on 2 ranks whose rank 1 reloads an expert in its first chunks and
    exchanges weights with rank 0 in later ones: rank 1's reload hook kills its own process.
    Rank 0 must raise PeerFailure (not return) within the group's timeout; returns the seconds
    it took."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = StatelessGroup(
        _rdzv(rank, port), "eplb-death", 0, rank, world_size, backend, device, timeout_s=timeout_s
    )
    sc = make_scenario("dead", 0, 2, 4, 8)  # rank 1: a reload at step 0, transfers to step 15
    plan = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
    old, new = _ranks_of(sc, rank)
    before = initial_weights(sc, old, new, tag=rank)
    weights = [[t.to(device) for t in layer] for layer in before]

    def reload(layer: int, expert: int) -> list[torch.Tensor]:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return expert_weights(layer, expert)

    # The smallest buffer: one step per chunk, so transfers follow the first reload.
    budget = required_buffer_bytes(plan, before, world_size)
    group.barrier()
    started = time.monotonic()
    try:
        execute(plan, weights, group, buffer_bytes=budget, reload=reload, overlap=False)
    except PeerFailure:
        return time.monotonic() - started
    finally:
        group.abort()
    raise AssertionError(f"rank {rank}: execute returned although its peer died")


def test_peer_dying_mid_run_raises_peer_failure_on_the_survivor() -> None:
    survivor, _ = run_ranks(peer_dies_mid_run, 2, "gloo", 5.0, timeout=60, expect_dead=[1])
    assert survivor < 2 * 5.0
