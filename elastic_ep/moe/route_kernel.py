"""Route logical top-k ids to physical slots and record the load, in one Triton launch.

The same rule as :func:`~elastic_ep.moe.routing.route_to_slots` (the torch reference): the pairs
``(token, choice)`` of one batch that chose logical expert ``e`` get ordinals ``j = 0, 1, ...``,
and pair ``j`` goes to entry ``(j + rank_offset) % logcnt[e]`` of ``log2phy[e]``. Here the ordinals
come from a per-expert atomic counter instead of a stable sort: each expert's ordinals are still
exactly ``0 .. n_e - 1``, so the tokens per row entry are exactly the reference's (they differ by
at most one over the entries), but WHICH pair gets which ordinal follows the order the atomics
land in, so the slot of one pair may differ from the reference's between runs. The split is
exact over row entries: an entry that appears k times in ``log2phy[e]`` gets k shares.

One launch does everything, so it replays inside a captured CUDA graph on the fixed-address
:class:`~elastic_ep.eplb.PlacementBuffers` rows. Two strategies hand out the ordinals
(:func:`plan_launch` picks one per batch size from H200 measurements):

- ``PAIRS``: one pair per thread; ordinal = fetch-add on expert ``e``'s counter. Above
  ``AGGREGATE_ABOVE_PAIRS`` the lanes of a warp that hold the same expert first agree
  (``match.any``) and one lane adds their number, so a hot expert costs one atomic per warp.
- ``SORTED``: each program sorts its block of pairs by expert (key ``expert * block +
  position``), counts each expert's run (``tl.histogram``), adds each run's length to its
  expert's counter with one fetch-add, and gives the run's pairs ``base + rank in the run``. One
  program alone needs no counters: the ranks are the ordinals.

Around that, for both:

1. Invalid ids (outside ``[0, E)``) and the pairs of padded tokens (``>= num_tokens``, read on
   the device) route to -1, take no ordinal and are not counted.
2. If recording (``record_flag[0] != 0``, read on the device), the counts are added to
   ``slot_counts`` and ``expert_counts``: by each program (``PAIRS``: 1 per pair; ``SORTED``: each
   run's length, and to each entry its share of the run), or, with ``Tally``, by the last program
   from the final counters (expert ``e`` got ``n_e`` pairs; entry ``r`` of its row
   ``n_e // c`` plus one if ``(r - rank_offset) mod c < n_e % c``).
3. The counters go back to zero for the next launch, so nothing else is launched: after a
   barrier by the program itself if it is the only one, else by the last program (each bumps the
   arrival counter once its fetch-adds have returned, before it writes anything; the one that
   reads ``programs - 1`` clears). Launches that share a scratch must not overlap (one scratch
   per layer, one stream). Counters sit one per 128-byte line (``COUNTER_STRIDE``) when several
   programs share them.

A ``running`` plan (``PAIRS``, counts added per pair) skips step 3: its ordinals come from a
second set of int64 counters that are never cleared, so expert ``e``'s ordinals in a batch are
``start_e .. start_e + n_e - 1`` with ``start_e`` where the last launch left them. Consecutive
ordinals split a batch over the row entries just as exactly (counts differ by at most one); which
entry gets the remainder rotates from batch to batch. No program waits for the others, so the
arrival atomic and the last program's clear leave the critical path. ``route_to_slots(...,
start=running_counters(scratch, E))`` taken before a launch is its exact reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from elastic_ep.moe.route_plan import (
    COUNTER_STRIDE,
    SINGLE_PROGRAM_PAIRS,
    SORTED_MAX_EXPERTS,
    LaunchPlan,
    Strategy,
    Tally,
    check_plan,
    plan_launch,
)

__all__ = [
    "COUNTER_STRIDE",
    "SINGLE_PROGRAM_PAIRS",
    "SORTED_MAX_EXPERTS",
    "LaunchPlan",
    "Strategy",
    "Tally",
    "new_route_scratch",
    "plan_launch",
    "route_and_record",
    "running_counters",
    "scratch_size",
    "triton_available",
]

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still routes; only the CUDA kernel needs Triton
    triton = None


def triton_available() -> bool:
    return triton is not None


def scratch_size(num_experts: int) -> int:
    """int32s in one layer's scratch: ``E + 1`` cleared counters (the last one counts arriving
    programs) and ``E`` running int64 counters, each on its own 128-byte line."""
    return (2 * num_experts + 1) * COUNTER_STRIDE


def running_counters(scratch: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E] view of ``scratch``'s running counters: expert e's next ordinal under a
    ``LaunchPlan.running`` launch (pass it as ``start`` to the torch reference to reproduce one)."""
    return scratch[(num_experts + 1) * COUNTER_STRIDE :].view(torch.int64)[:: COUNTER_STRIDE // 2]


def new_route_scratch(num_experts: int, device: torch.device | str) -> torch.Tensor:
    """int32 [scratch_size(E)] zeros: the counters of one layer's launches (the cleared ones kept
    zero between launches by the kernel itself; allocate once, e.g. as a buffer of the layer)."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    return torch.zeros(scratch_size(num_experts), dtype=torch.int32, device=device)


if triton is not None:

    @triton.jit
    def _warp_fetch_add(ptr, key):
        """Per lane: old value of ``*ptr`` plus the lane's rank among the warp's lanes with the
        same ``key``; one lane of each such group adds the group's size. ``key < 0``: no add."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p_lead, p_on;
            .reg .b32 peers, below, rank, size, first, old;
            match.any.sync.b32 peers, $1, 0xffffffff;
            mov.u32 below, %lanemask_lt;
            and.b32 below, below, peers;
            popc.b32 rank, below;
            popc.b32 size, peers;
            setp.eq.u32 p_lead, rank, 0;
            setp.ge.s32 p_on, $1, 0;
            and.pred p_lead, p_lead, p_on;
            mov.u32 old, 0;
            @p_lead atom.global.add.u32 old, [$2], size;
            brev.b32 first, peers;
            bfind.shiftamt.u32 first, first;
            shfl.sync.idx.b32 old, old, first, 31, 0xffffffff;
            add.u32 $0, old, rank;
            }""",
            constraints="=r,r,l",
            args=[key, ptr],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _warp_fetch_add64(ptr, key):
        """:func:`_warp_fetch_add` on an int64 counter (running counters): int64 per lane."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p_lead, p_on;
            .reg .b32 peers, below, rank, size, first, low, high;
            .reg .b64 size64, rank64, old;
            match.any.sync.b32 peers, $1, 0xffffffff;
            mov.u32 below, %lanemask_lt;
            and.b32 below, below, peers;
            popc.b32 rank, below;
            popc.b32 size, peers;
            setp.eq.u32 p_lead, rank, 0;
            setp.ge.s32 p_on, $1, 0;
            and.pred p_lead, p_lead, p_on;
            cvt.u64.u32 size64, size;
            mov.u64 old, 0;
            @p_lead atom.global.add.u64 old, [$2], size64;
            brev.b32 first, peers;
            bfind.shiftamt.u32 first, first;
            mov.b64 {low, high}, old;
            shfl.sync.idx.b32 low, low, first, 31, 0xffffffff;
            shfl.sync.idx.b32 high, high, first, 31, 0xffffffff;
            mov.b64 old, {low, high};
            cvt.u64.u32 rank64, rank;
            add.u64 $0, old, rank64;
            }""",
            constraints="=l,r,l",
            args=[key, ptr],
            dtype=tl.int64,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _warp_add(ptr, key):
        """Add, per group of a warp's lanes with the same ``key >= 0``, the group's size to
        ``*ptr`` (one lane's ``red``). Returns a dummy."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .pred p_lead, p_on;
            .reg .b32 peers, below, rank, size;
            match.any.sync.b32 peers, $1, 0xffffffff;
            mov.u32 below, %lanemask_lt;
            and.b32 below, below, peers;
            popc.b32 rank, below;
            popc.b32 size, peers;
            setp.eq.u32 p_lead, rank, 0;
            setp.ge.s32 p_on, $1, 0;
            and.pred p_lead, p_lead, p_on;
            @p_lead red.global.add.u32 [$2], size;
            mov.u32 $0, 0;
            }""",
            constraints="=r,r,l",
            args=[key, ptr],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _larger(a, b):
        """``tl.max``'s combine, defined here: Triton's interpreter runs it from a kernel, while
        it cannot run ``tl.max`` itself (a jit function of another module) from one."""
        return tl.maximum(a, b)

    @triton.jit
    def _tally_and_clear(
        scratch_ptr,
        stride,
        log2phy_ptr,
        logcnt_ptr,
        slot_counts_ptr,
        expert_counts_ptr,
        recording,
        num_experts,
        row_stride,
        rank_offset,
        TALLY: tl.constexpr,
        E_BLOCK: tl.constexpr,
        R_TILE: tl.constexpr,
    ):
        """The last program's tail: every counter back to 0, after adding (``TALLY >= 1``) the
        batch's pairs per expert to the expert counts and (``TALLY == 2``) each row entry's share
        of them to its slot count."""
        for start in range(0, num_experts, E_BLOCK):
            experts = start + tl.arange(0, E_BLOCK)
            inside = experts < num_experts
            if TALLY == 0:
                tl.store(scratch_ptr + experts * stride, 0, mask=inside)
            else:
                pairs = tl.atomic_xchg(
                    scratch_ptr + experts * stride, 0, mask=inside, sem="relaxed"
                )
                replicas = tl.load(logcnt_ptr + experts, mask=inside, other=0).to(tl.int32)
                take = inside & (replicas > 0) & recording
                tl.atomic_add(
                    expert_counts_ptr + experts, pairs, mask=take & (pairs > 0), sem="relaxed"
                )
                if TALLY == 2:
                    # Counter e holds n_e, the batch's valid pairs of expert e; row entry r got
                    # the ordinals j < n_e with (j + rank_offset) % c == r: n_e // c of them,
                    # plus one if (r - rank_offset) mod c < n_e % c.
                    c = tl.maximum(replicas, 1)[:, None]
                    n = pairs[:, None]
                    for first in range(0, tl.reduce(replicas, 0, _larger), R_TILE):
                        r = first + tl.arange(0, R_TILE)[None, :]
                        has = take[:, None] & (r < replicas[:, None])
                        row = experts[:, None] * row_stride
                        entry_slot = tl.load(log2phy_ptr + row + r, mask=has, other=0)
                        rotated = ((r - rank_offset) % c + c) % c
                        share = n // c + (rotated < n % c).to(tl.int32)
                        tl.atomic_add(
                            slot_counts_ptr + entry_slot,
                            share,
                            mask=has & (share > 0),
                            sem="relaxed",
                        )
        tl.store(scratch_ptr + num_experts * stride, 0)

    @triton.jit
    def _route_kernel(  # unannotated: Triton rejects non-constexpr globals such as Any
        ids_ptr,
        log2phy_ptr,
        logcnt_ptr,
        out_ptr,
        scratch_ptr,
        running_ptr,
        slot_counts_ptr,
        expert_counts_ptr,
        flag_ptr,
        num_tokens_ptr,
        numel,
        top_k,
        num_experts,
        row_stride,
        rank_offset,
        stride,
        RECORD: tl.constexpr,
        HAS_NUM_TOKENS: tl.constexpr,
        SINGLE: tl.constexpr,
        RUNNING: tl.constexpr,
        RUNNING_STRIDE: tl.constexpr,
        WARP_AGGREGATE: tl.constexpr,
        TALLY: tl.constexpr,
        BLOCK: tl.constexpr,
        E_BLOCK: tl.constexpr,
        R_TILE: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < numel
        raw = tl.load(ids_ptr + offs, mask=in_range, other=-1)
        valid = in_range & (raw >= 0) & (raw < num_experts)
        if HAS_NUM_TOKENS:
            valid = valid & (offs < tl.load(num_tokens_ptr) * top_k)
        expert = tl.where(valid, raw, 0).to(tl.int32)
        if RECORD:
            recording = tl.load(flag_ptr) != 0
        # Loads first: the fetch-add below waits for its reply, and a load issued after it would
        # start only then. An expert without replicas wastes its counter (cleared anyway).
        count = tl.load(logcnt_ptr + expert, mask=valid, other=0).to(tl.int32)
        if RUNNING:
            # int64: the counters never wrap, so a batch's ordinals are always consecutive.
            counter = running_ptr + expert.to(tl.int64) * RUNNING_STRIDE
            if WARP_AGGREGATE:
                ordinal = _warp_fetch_add64(counter, tl.where(valid, expert, -1))
            else:
                ordinal = tl.atomic_add(counter, 1, mask=valid, sem="relaxed")
            # ``>> 63`` is 0; it ties the count's use to the fetch-add's reply (see below).
            count = count | (ordinal >> 63).to(tl.int32)
            turn = (ordinal + rank_offset) % tl.maximum(count, 1).to(tl.int64)
            entry = turn.to(tl.int32)
        else:
            if WARP_AGGREGATE:
                ordinal = _warp_fetch_add(
                    scratch_ptr + expert * stride, tl.where(valid, expert, -1)
                )
            else:
                ordinal = tl.atomic_add(scratch_ptr + expert * stride, 1, mask=valid, sem="relaxed")
            # ``ordinal >> 31`` is 0 (ordinals are < 2**31), but ties the count's use to the
            # fetch-add's reply: otherwise ptxas starts the modulo's division before the atomic
            # is issued, so the atomic waits for the count load and the two round trips run one
            # after the other.
            count = count | (ordinal >> 31)
            entry = (ordinal + rank_offset) % tl.maximum(count, 1)
        routed = valid & (count > 0)
        slot = tl.load(
            log2phy_ptr + expert.to(tl.int64) * row_stride + entry, mask=routed, other=-1
        )
        if not SINGLE and not RUNNING:
            # Arrive once every lane's fetch-add has returned (its reply addressed the load
            # above) and before this program writes anything: the release's fence then waits
            # for no store, only for the row load that the store needs anyway.
            tl.debug_barrier()
            arrived = tl.atomic_add(scratch_ptr + num_experts * stride, 1, sem="release")
        tl.store(out_ptr + offs, slot.to(out_ptr.dtype.element_ty), mask=in_range)
        if RECORD:
            counted = routed & recording
            slot32 = tl.where(counted, slot, 0).to(tl.int32)
            if TALLY < 2:
                if WARP_AGGREGATE:
                    _warp_add(slot_counts_ptr + slot32, tl.where(counted, slot32, -1))
                else:
                    tl.atomic_add(slot_counts_ptr + slot32, 1, mask=counted, sem="relaxed")
            if TALLY < 1:
                if WARP_AGGREGATE:
                    _warp_add(expert_counts_ptr + expert, tl.where(counted, expert, -1))
                else:
                    tl.atomic_add(expert_counts_ptr + expert, 1, mask=counted, sem="relaxed")
        else:
            recording = False
        if RUNNING:  # nothing to clear
            last = False
        elif SINGLE:
            # Every lane's fetch-add has returned (its value was used above) before it clears.
            tl.debug_barrier()
            last = True
        else:
            last = arrived == tl.num_programs(0) - 1
        if last:
            _tally_and_clear(
                scratch_ptr,
                stride,
                log2phy_ptr,
                logcnt_ptr,
                slot_counts_ptr,
                expert_counts_ptr,
                recording,
                num_experts,
                row_stride,
                rank_offset,
                TALLY,
                E_BLOCK,
                R_TILE,
            )

    @triton.jit
    def _route_sorted_kernel(
        ids_ptr,
        log2phy_ptr,
        logcnt_ptr,
        out_ptr,
        scratch_ptr,
        slot_counts_ptr,
        expert_counts_ptr,
        flag_ptr,
        num_tokens_ptr,
        numel,
        top_k,
        num_experts,
        row_stride,
        rank_offset,
        stride,
        RECORD: tl.constexpr,
        HAS_NUM_TOKENS: tl.constexpr,
        SINGLE: tl.constexpr,
        TALLY: tl.constexpr,
        BLOCK: tl.constexpr,
        E_BLOCK: tl.constexpr,
        R_TILE: tl.constexpr,
    ):
        """One block of ``BLOCK`` pairs: sort by expert, one fetch-add per expert present."""
        first_pair = tl.program_id(0) * BLOCK
        local = tl.arange(0, BLOCK)
        in_range = local < numel - first_pair
        raw = tl.load(ids_ptr + first_pair + local, mask=in_range, other=-1)
        valid = in_range & (raw >= 0) & (raw < num_experts)
        if HAS_NUM_TOKENS:
            valid = valid & (local < tl.load(num_tokens_ptr) * top_k - first_pair)
        experts = tl.arange(0, E_BLOCK)
        replicas = tl.load(logcnt_ptr + experts, mask=experts < num_experts, other=0).to(tl.int32)
        # The block's pairs per expert, and where each expert's run starts once sorted.
        pairs = tl.histogram(tl.where(valid, raw, 0).to(tl.int32), E_BLOCK, mask=valid)
        run_start = tl.cumsum(pairs, 0) - pairs
        # Key = expert * BLOCK + position: sorted, each expert's pairs are one run, masked pairs
        # (expert := num_experts) last; the key's low bits say where the pair came from.
        key = tl.sort(tl.where(valid, raw, num_experts).to(tl.int32) * BLOCK + local)
        mine = key % BLOCK
        expert = key // BLOCK
        ok = expert < num_experts
        expert = tl.where(ok, expert, 0)
        rank = local - tl.gather(run_start, expert, 0)
        taken = (pairs > 0) & (replicas > 0)
        if SINGLE:
            ordinal = rank
        else:
            base = tl.atomic_add(scratch_ptr + experts * stride, pairs, mask=taken, sem="relaxed")
            ordinal = tl.gather(base, expert, 0) + rank
        count = tl.gather(replicas, expert, 0)
        routed = ok & (count > 0)
        entry = (ordinal + rank_offset) % tl.maximum(count, 1)
        slot = tl.load(log2phy_ptr + expert * row_stride + entry, mask=routed, other=-1)
        if not SINGLE:
            # Every fetch-add has returned (gathered above): arrive before writing anything.
            tl.debug_barrier()
            arrived = tl.atomic_add(scratch_ptr + num_experts * stride, 1, sem="release")
        tl.store(
            out_ptr + first_pair + mine,
            slot.to(out_ptr.dtype.element_ty),
            mask=mine < numel - first_pair,
        )
        if RECORD:
            recording = tl.load(flag_ptr) != 0
            if TALLY < 1:
                tl.atomic_add(
                    expert_counts_ptr + experts, pairs, mask=taken & recording, sem="relaxed"
                )
            if TALLY < 2:
                # The run's ordinals rank, rank + c, ... all land on this pair's entry: the
                # first c pairs of the run add the run's share of their entries.
                run = tl.gather(pairs, expert, 0)
                share = (run - 1 - rank) // tl.maximum(count, 1) + 1
                tl.atomic_add(
                    slot_counts_ptr + tl.where(routed, slot, 0).to(tl.int32),
                    share,
                    mask=routed & (rank < count) & recording,
                    sem="relaxed",
                )
        else:
            recording = False
        if not SINGLE:  # noqa: SIM102 (a compile-time branch: ``arrived`` exists only here)
            if arrived == tl.num_programs(0) - 1:
                _tally_and_clear(
                    scratch_ptr,
                    stride,
                    log2phy_ptr,
                    logcnt_ptr,
                    slot_counts_ptr,
                    expert_counts_ptr,
                    recording,
                    num_experts,
                    row_stride,
                    rank_offset,
                    TALLY,
                    E_BLOCK,
                    R_TILE,
                )


def route_and_record(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    scratch: torch.Tensor,
    *,
    rank_offset: int = 0,
    slot_counts: torch.Tensor | None = None,
    expert_counts: torch.Tensor | None = None,
    record_flag: torch.Tensor | None = None,
    num_tokens: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    plan: LaunchPlan | None = None,
    kernels: Mapping[Strategy, Any] | None = None,
) -> torch.Tensor:
    """Physical slot of every (token, choice) pair of one layer, and its load recorded: one launch.

    Args:
        topk_ids: int32 or int64 [T, K] logical expert ids; ids outside ``[0, E)`` route to -1.
        log2phy: int64 [E, R] this layer's row entries (e.g. ``buffers.log2phy[layer]``), unit
            stride along R; -1 padded.
        logcnt: int64 [E] entries used per row (``buffers.logcnt[layer]``); 0 routes to -1.
        scratch: int32 [scratch_size(E)] from :func:`new_route_scratch`: cleared counter e at
            ``e * COUNTER_STRIDE`` when several programs share it, at ``e`` for one program
            (zero between launches); running counters after them (:func:`running_counters`).
        rank_offset: rotates the entry choice (pass the EP rank).
        slot_counts: int32 [capacity], e.g. ``LoadRecord.slot_counts[layer]``: += routed pairs
            per slot. Given together with ``expert_counts`` and ``record_flag``.
        expert_counts: int32 [E], e.g. ``LoadRecord.step_counts[layer]``: += routed pairs per
            logical expert.
        record_flag: int32 [1], e.g. ``LoadRecord.recording``: counts are added only while
            ``record_flag[0] != 0`` (read on the device, so a captured graph follows it).
        num_tokens: integer [1] on the device: tokens ``>= num_tokens[0]`` are padding, route to
            -1 and are not counted. ``None``: all T are real.
        out: [T, K] of ``topk_ids``' dtype to write into (default: a new tensor).
        plan: the launch (default: :func:`plan_launch`'s measured choice).
        kernels: the Triton kernel per strategy (tests pass interpreted ones on CPU; those
            cannot run the PTX of ``LaunchPlan.aggregate``).
    Returns:
        [T, K] physical slots (``topk_ids``' dtype), -1 where not routed.
    """
    if triton is None:
        raise RuntimeError("route_and_record needs Triton; use routing.route_to_slots instead")
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.dim() != 2:
        raise TypeError(
            f"topk_ids must be int32/int64 [T, K], got {topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    num_experts = log2phy.shape[0]
    if log2phy.dtype != torch.int64 or log2phy.dim() != 2 or log2phy.stride(1) != 1:
        raise TypeError(
            f"log2phy must be int64 [E, R] with unit stride along R, got {log2phy.dtype} {tuple(log2phy.shape)}"
        )
    if logcnt.dtype != torch.int64 or logcnt.shape != (num_experts,) or logcnt.stride(0) != 1:
        raise TypeError(
            f"logcnt must be contiguous int64 [{num_experts}], got {logcnt.dtype} {tuple(logcnt.shape)}"
        )
    if (
        scratch.dtype != torch.int32
        or scratch.shape != (scratch_size(num_experts),)
        or scratch.stride(0) != 1
        or scratch.storage_offset() % 2
    ):
        raise TypeError(
            f"scratch must be a contiguous int32 [{scratch_size(num_experts)}] for E = "
            f"{num_experts} (new_route_scratch), got {scratch.dtype} {tuple(scratch.shape)}"
        )
    record = (slot_counts, expert_counts, record_flag)
    if any(t is None for t in record) and any(t is not None for t in record):
        raise ValueError("slot_counts, expert_counts and record_flag go together")
    if slot_counts is not None and (
        slot_counts.dtype != torch.int32 or slot_counts.dim() != 1 or slot_counts.stride(0) != 1
    ):
        raise TypeError("slot_counts must be a contiguous int32 [capacity]")
    if expert_counts is not None and (
        expert_counts.dtype != torch.int32
        or expert_counts.shape != (num_experts,)
        or expert_counts.stride(0) != 1
    ):
        raise TypeError(f"expert_counts must be a contiguous int32 [{num_experts}]")
    if num_tokens is not None and (
        num_tokens.dtype not in (torch.int32, torch.int64) or num_tokens.shape != (1,)
    ):
        raise TypeError(
            f"num_tokens must be an int32/int64 [1], got {num_tokens.dtype} {tuple(num_tokens.shape)}"
        )
    if not isinstance(rank_offset, int) or rank_offset < 0:
        raise ValueError(f"rank_offset must be a non-negative int, got {rank_offset!r}")
    ids = topk_ids.contiguous()
    if out is None:
        out = torch.empty_like(ids)
    elif out.shape != ids.shape or out.dtype != ids.dtype or not out.is_contiguous():
        raise TypeError(f"out must be a contiguous {ids.dtype} {tuple(ids.shape)}")
    numel = ids.numel()
    if numel == 0:
        return out
    if plan is None:
        plan = plan_launch(numel, num_experts)
        if kernels is not None:
            plan = dataclasses.replace(plan, aggregate=False)
    check_plan(plan, num_experts)
    programs = triton.cdiv(numel, plan.block)
    if kernels is None:
        kernels = {Strategy.PAIRS: _route_kernel, Strategy.SORTED: _route_sorted_kernel}
    kernel = kernels[plan.strategy]
    counted = slot_counts is not None and (plan.strategy is Strategy.PAIRS or programs > 1)
    options: dict[str, Any] = {
        "TALLY": int(plan.tally) if counted else 0,
        "E_BLOCK": max(16, triton.next_power_of_2(num_experts)),
        "R_TILE": 4,
    }
    if plan.strategy is Strategy.PAIRS:
        options |= {
            "WARP_AGGREGATE": plan.aggregate,
            "E_BLOCK": min(1024, triton.next_power_of_2(num_experts)),
        }
    counters = (num_experts + 1) * COUNTER_STRIDE
    pointers = [ids, log2phy, logcnt, out, scratch]
    if plan.strategy is Strategy.PAIRS:
        pointers.append(scratch[counters:].view(torch.int64))
        options |= {"RUNNING": plan.running, "RUNNING_STRIDE": COUNTER_STRIDE // 2}
    kernel[(programs,)](
        *pointers,
        slot_counts if slot_counts is not None else scratch,
        expert_counts if expert_counts is not None else scratch,
        record_flag if record_flag is not None else scratch,
        num_tokens if num_tokens is not None else scratch,
        numel,
        ids.shape[1],
        num_experts,
        log2phy.stride(0),
        rank_offset,
        1 if programs == 1 else COUNTER_STRIDE,
        RECORD=slot_counts is not None,
        HAS_NUM_TOKENS=num_tokens is not None,
        SINGLE=programs == 1,
        BLOCK=plan.block,
        num_warps=plan.warps,
        **options,
    )
    return out
