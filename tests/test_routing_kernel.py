"""The fused routing kernel (Triton's CPU interpreter) against the torch reference.

The kernel hands out each expert's ordinals with atomics, so the tokens per replica are exactly the
reference's while which pair lands on which replica may differ: the checks compare per-slot
counts, the set of slots each expert uses, and that each pair's slot holds its expert, never the
slot of one pair.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import Placement
from elastic_ep.moe import LoadRecord, route_to_slots
from elastic_ep.moe import route_kernel as rk
from tests.test_routing import placements, random_placement
from tests.test_shares import shared_placements
from tests.triton_interpreter import interpreted_language

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernels() -> dict[rk.Strategy, Any]:
    """Both kernels run by Triton's interpreter (its scalar loop bound patched as the row-copy
    tests do)."""
    from triton.runtime import interpreter

    from tests.triton_interpreter import interpreted_row_copy_kernel

    interpreted_row_copy_kernel()
    return {
        rk.Strategy.PAIRS: interpreter.InterpretedFunction(rk._route_kernel.fn),
        rk.Strategy.SORTED: interpreter.InterpretedFunction(rk._route_sorted_kernel.fn),
    }


SHAPES = pytest.mark.parametrize(
    "shape",
    [
        "pairs one",
        "pairs blocks",
        "pairs running one",
        "pairs running blocks",
        "pairs experts tallied",
        "pairs tallied",
        "sorted one",
        "sorted blocks",
        "sorted tallied",
    ],
)
"""The launch shapes: per-pair fetch-adds in one program; in blocks of 32 pairs, where the
last program clears the counters; both with running counters (nothing cleared; they start from
values left by earlier launches); the same blocks where the last program also adds the expert
counts, or all counts, from the counters; the sorted kernel in one program (no counters), in blocks of 16 pairs, and the same
where the last program adds all counts."""


def _plan(shape: str, numel: int) -> rk.LaunchPlan:
    one = max(32, 1 << max(0, numel - 1).bit_length())
    pairs, sorted_ = rk.Strategy.PAIRS, rk.Strategy.SORTED
    return {
        "pairs one": rk.LaunchPlan(pairs, one, one // 32),
        "pairs blocks": rk.LaunchPlan(pairs, 32, 1),
        "pairs running one": rk.LaunchPlan(pairs, one, one // 32, running=True),
        "pairs running blocks": rk.LaunchPlan(pairs, 32, 1, running=True),
        "pairs experts tallied": rk.LaunchPlan(pairs, 32, 1, tally=rk.Tally.EXPERTS),
        "pairs tallied": rk.LaunchPlan(pairs, 32, 1, tally=rk.Tally.ALL),
        "sorted one": rk.LaunchPlan(sorted_, one, 4),
        "sorted blocks": rk.LaunchPlan(sorted_, 16, 1),
        "sorted tallied": rk.LaunchPlan(sorted_, 16, 1, tally=rk.Tally.ALL),
    }[shape]


def _ids(gen: torch.Generator, tokens: int, experts: int, top_k: int) -> torch.Tensor:
    if tokens == 0:
        return torch.empty(0, top_k, dtype=torch.int64)
    return torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])


def _route(
    kernels: dict[rk.Strategy, Any],
    shape: str,
    ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    capacity: int,
    offset: int = 0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(slots, slot_counts, expert_counts, start): ``start`` int64 [E] the running counters
    before the launch (drawn from ``offset``, as earlier launches would have left them), for
    the reference; ``None`` for plans that clear their counters, which must be zero after it."""
    experts = log2phy.shape[0]
    scratch = rk.new_route_scratch(experts, "cpu")
    plan = _plan(shape, ids.numel())
    running = rk.running_counters(scratch, experts)
    if plan.running:
        gen = torch.Generator().manual_seed(offset)
        running.copy_(torch.randint(0, 2**40, (experts,), generator=gen))
    start = running.clone()
    slot_counts = torch.full((capacity,), 3, dtype=torch.int32)
    expert_counts = torch.full((experts,), 3, dtype=torch.int32)
    kwargs.setdefault("record_flag", torch.ones(1, dtype=torch.int32))
    with interpreted_language(rk):
        slots = rk.route_and_record(
            ids,
            log2phy,
            logcnt,
            scratch,
            rank_offset=offset,
            slot_counts=slot_counts,
            expert_counts=expert_counts,
            plan=plan,
            kernels=kernels,
            **kwargs,
        )
    cleared = scratch[: (experts + 1) * rk.COUNTER_STRIDE]
    assert int(cleared.abs().sum()) == 0  # counters cleared for the next launch
    if not plan.running:
        assert torch.equal(running, start)
        return slots, slot_counts - 3, expert_counts - 3, None
    real = ids[: int(kwargs["num_tokens"][0])] if "num_tokens" in kwargs else ids
    valid = real[(real >= 0) & (real < experts)]
    # Every valid pair took one ordinal (also of an expert without replicas).
    assert torch.equal(running - start, torch.bincount(valid, minlength=experts))
    return slots, slot_counts - 3, expert_counts - 3, start


def _slot_sets(slots: torch.Tensor, ids: torch.Tensor) -> dict[int, set[int]]:
    sets: dict[int, set[int]] = {}
    for e, s in zip(ids.reshape(-1).tolist(), slots.reshape(-1).tolist(), strict=True):
        sets.setdefault(e, set()).add(s)
    return sets


@SHAPES
@settings(max_examples=15, deadline=None)
@given(placements(), st.integers(0, 60), st.integers(0, 7), st.integers(0, 2**31))
def test_kernel_counts_equal_the_reference(
    kernels: dict[rk.Strategy, Any],
    shape: str,
    placement: Placement,
    tokens: int,
    offset: int,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    top_k = int(torch.randint(1, placement.num_logical + 1, (1,), generator=gen))
    ids = _ids(gen, tokens, placement.num_logical, top_k)
    capacity = placement.num_slots
    for layer in range(placement.num_layers):
        l2p, cnt, p2l = placement.log2phy[layer], placement.logcnt[layer], placement.phy2log[layer]
        slots, slot_counts, expert_counts, start = _route(
            kernels, shape, ids, l2p, cnt, capacity, offset
        )
        want = route_to_slots(ids, l2p, cnt, rank_offset=offset, start=start)
        assert slots.shape == ids.shape and slots.dtype == torch.int64
        assert torch.equal(p2l[slots], ids)  # every pair lands on a slot of its expert
        per_slot = torch.bincount(want.reshape(-1), minlength=capacity).to(torch.int32)
        assert torch.equal(torch.bincount(slots.reshape(-1), minlength=capacity), per_slot)
        assert _slot_sets(slots, ids) == _slot_sets(want, ids)
        record = LoadRecord(1, placement.num_logical, capacity, 1)
        record.record_(0, want, p2l)
        assert torch.equal(slot_counts, record.slot_counts[0])
        assert torch.equal(expert_counts, record.step_counts[0])


@SHAPES
@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 80), st.integers(0, 2**31))
def test_repeated_row_entries_get_their_multiple(
    kernels: dict[rk.Strategy, Any], shape: str, experts: int, width: int, tokens: int, seed: int
) -> None:
    """A slot that appears k times in an expert's row gets k shares: the split is exact over row
    entries (counts per entry differ by at most one), on both paths."""
    gen = torch.Generator().manual_seed(seed)
    capacity = experts * width
    logcnt = torch.randint(1, width + 1, (experts,), generator=gen)
    log2phy = torch.full((experts, width), -1, dtype=torch.int64)
    for e in range(experts):  # entries drawn with repetition from the expert's own slots
        own = torch.arange(e * width, e * width + int(torch.randint(1, width + 1, (1,))))
        log2phy[e, : logcnt[e]] = own[torch.randint(0, len(own), (int(logcnt[e]),))]
    ids = torch.randint(0, experts, (tokens, 2), generator=gen)
    got, slot_counts, _, start = _route(kernels, shape, ids, log2phy, logcnt, capacity, seed % 5)
    assert torch.equal(slot_counts, torch.bincount(got.reshape(-1), minlength=capacity).int())
    want = route_to_slots(ids, log2phy, logcnt, rank_offset=seed % 5, start=start)
    for slots in (want, got):
        per_slot = torch.bincount(slots.reshape(-1), minlength=capacity)
        for e in range(experts):
            n = int((ids == e).sum())
            c = int(logcnt[e])
            entries = log2phy[e, :c]
            for slot in entries.unique().tolist():
                k = int((entries == slot).sum())
                assert k * (n // c) <= int(per_slot[slot]) <= k * -(-n // c), (e, slot, k, n, c)


@SHAPES
@settings(max_examples=15, deadline=None)
@given(shared_placements(), st.integers(0, 60), st.integers(0, 2**31))
def test_kernel_follows_routing_shares(
    kernels: dict[rk.Strategy, Any], shape: str, placement: Placement, tokens: int, seed: int
) -> None:
    """Rows with repeats from ``Placement.units``: the kernel's per-slot counts equal the
    reference's."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, placement.num_logical, (tokens, 1), generator=gen)
    for layer in range(placement.num_layers):
        l2p, cnt = placement.log2phy[layer], placement.logcnt[layer]
        got, _, _, start = _route(kernels, shape, ids, l2p, cnt, placement.num_slots, seed % 5)
        want = route_to_slots(ids, l2p, cnt, rank_offset=seed % 5, start=start)
        capacity = placement.num_slots + 1  # -1 (expert not placed) counted in the last bin
        assert torch.equal(
            torch.bincount(got.reshape(-1) % capacity, minlength=capacity),
            torch.bincount(want.reshape(-1) % capacity, minlength=capacity),
        )


@SHAPES
def test_padding_invalid_ids_and_record_flag(kernels: dict[rk.Strategy, Any], shape: str) -> None:
    gen = torch.Generator().manual_seed(3)
    placement = random_placement(gen, 1, 8, 2, 6)
    l2p, cnt, p2l = placement.log2phy[0], placement.logcnt[0], placement.phy2log[0]
    ids = _ids(gen, 20, 8, 3)
    ids[4, 1], ids[7, 0] = -1, 8  # out of range: routed nowhere, not counted
    real = 15  # tokens 15.. are padding
    slots, slot_counts, expert_counts, start = _route(
        kernels, shape, ids, l2p, cnt, 12, 1, num_tokens=torch.tensor([real])
    )
    bad = (ids < 0) | (ids >= 8)
    bad[real:] = True
    assert bool((slots[bad] == -1).all()) and bool((slots[~bad] >= 0).all())
    assert torch.equal(p2l[slots[~bad]], ids[~bad])
    kept = ids[:real].clone()
    kept[(kept < 0) | (kept >= 8)] = 0
    want = route_to_slots(kept, l2p, cnt, rank_offset=1, start=start)
    want[bad[:real]] = -1
    assert torch.equal(slot_counts, torch.bincount(want[want >= 0], minlength=12).to(torch.int32))
    assert torch.equal(expert_counts, torch.bincount(ids[~bad], minlength=8).to(torch.int32))
    # Not recording: the same slots, nothing added.
    off = torch.zeros(1, dtype=torch.int32)
    slots_off, slot_counts, expert_counts, _ = _route(
        kernels, shape, ids, l2p, cnt, 12, 1, num_tokens=torch.tensor([real]), record_flag=off
    )
    assert int(slot_counts.abs().sum()) == 0 and int(expert_counts.abs().sum()) == 0
    assert torch.equal((slots_off == -1), bad)


@pytest.mark.parametrize("strategy", list(rk.Strategy))
def test_int32_ids_give_int32_slots_and_an_out_tensor_is_filled(
    kernels: dict[rk.Strategy, Any], strategy: rk.Strategy
) -> None:
    placement = Placement(torch.tensor([[0, 1, 0, 2, 0, -1]]), 3, 2)
    ids = torch.tensor([[0, 1], [0, 2], [2, 0], [0, 1]], dtype=torch.int32)
    out = torch.full((4, 2), -7, dtype=torch.int32)
    with interpreted_language(rk):
        got = rk.route_and_record(
            ids,
            placement.log2phy[0],
            placement.logcnt[0],
            rk.new_route_scratch(3, "cpu"),
            rank_offset=1,
            out=out,
            plan=rk.LaunchPlan(strategy, 32, 1),
            kernels=kernels,
        )
    assert got is out and out.dtype == torch.int32
    # Expert 0's four pairs over its three replicas (slots 0, 2, 4), starting at replica 1.
    assert sorted(out[ids == 0].tolist()) == [0, 2, 2, 4]
    assert out[ids == 1].tolist() == [1, 1] and out[ids == 2].tolist() == [3, 3]


def test_bad_arguments_raise_clearly() -> None:
    placement = Placement(torch.tensor([[0, 1]]), 2, 1)
    l2p, cnt = placement.log2phy[0], placement.logcnt[0]
    scratch = rk.new_route_scratch(2, "cpu")
    ids = torch.tensor([[0]])
    with pytest.raises(TypeError, match="topk_ids"):
        rk.route_and_record(ids.float(), l2p, cnt, scratch)
    with pytest.raises(TypeError, match="log2phy"):
        rk.route_and_record(ids, torch.zeros(2, 4, dtype=torch.int64)[:, ::2], cnt, scratch)
    with pytest.raises(TypeError, match="logcnt"):
        rk.route_and_record(ids, l2p, cnt[:1], scratch)
    with pytest.raises(TypeError, match="scratch"):
        rk.route_and_record(ids, l2p, cnt, scratch[:2])
    with pytest.raises(ValueError, match="go together"):
        rk.route_and_record(ids, l2p, cnt, scratch, slot_counts=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank_offset"):
        rk.route_and_record(ids, l2p, cnt, scratch, rank_offset=-1)
    with pytest.raises(TypeError, match="num_tokens"):
        rk.route_and_record(ids, l2p, cnt, scratch, num_tokens=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_experts"):
        rk.new_route_scratch(0, "cpu")
    for plan, problem in [
        (rk.LaunchPlan(rk.Strategy.SORTED, 48, 2), "power-of-two block"),
        (rk.LaunchPlan(rk.Strategy.PAIRS, 256, 4), "one pair per thread"),
    ]:
        with pytest.raises(ValueError, match=problem):
            rk.route_and_record(ids, l2p, cnt, scratch, plan=plan)
    many = rk.SORTED_MAX_EXPERTS + 1
    with pytest.raises(ValueError, match="at most"):
        rk.route_and_record(
            ids,
            torch.zeros(many, 1, dtype=torch.int64),
            torch.ones(many, dtype=torch.int64),
            rk.new_route_scratch(many, "cpu"),
            plan=rk.LaunchPlan(rk.Strategy.SORTED, 32, 1),
        )


@pytest.mark.parametrize(
    ("pairs", "experts"),
    [(8, 256), (1024, 384), (4096, 64), (4096, 256), (32768, 384), (2**17, 64)],
)
def test_measured_plans_compile_for_hopper(pairs: int, experts: int) -> None:
    """The real compiler (no GPU needed) builds sm_90 code for each plan ``plan_launch`` picks;
    a warp-aggregated plan has its warp-wide match in the PTX."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    plan = rk.plan_launch(pairs, experts)
    single = pairs <= plan.block
    pointers = ("ids", "log2phy", "logcnt", "out")
    signature = {f"{name}_ptr": "*i64" for name in pointers}
    signature["scratch_ptr"] = "*i32"
    if plan.strategy is rk.Strategy.PAIRS:
        signature["running_ptr"] = "*i64"
    for name in ("slot_counts", "expert_counts", "flag", "num_tokens"):
        signature[f"{name}_ptr"] = "*i32"
    for name in ("numel", "top_k", "num_experts", "row_stride", "rank_offset", "stride"):
        signature[name] = "i32"
    constexprs: dict[str, Any] = {
        "RECORD": True,
        "HAS_NUM_TOKENS": True,
        "SINGLE": single,
        "TALLY": int(plan.tally),
        "BLOCK": plan.block,
        "E_BLOCK": experts if experts & (experts - 1) == 0 else 512,
        "R_TILE": 4,
    }
    if plan.strategy is rk.Strategy.PAIRS:
        constexprs["RUNNING"] = plan.running
        constexprs["RUNNING_STRIDE"] = rk.COUNTER_STRIDE // 2
        constexprs["WARP_AGGREGATE"] = plan.aggregate
    kernel = {rk.Strategy.PAIRS: rk._route_kernel, rk.Strategy.SORTED: rk._route_sorted_kernel}
    source = ASTSource(
        fn=kernel[plan.strategy],
        signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs,
    )
    try:
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": plan.warps}
        )
    except RuntimeError as err:  # no ptxas in this triton install
        pytest.skip(f"cannot compile for CUDA here: {err}")
    ptx = compiled.asm["ptx"]
    assert ("match.any.sync.b32" in ptx) == plan.aggregate
    assert bool(re.search(r"atom\.global[.\w]*add\.u64", ptx)) == plan.running
