"""Launch plans of the routing kernel (:mod:`elastic_ep.moe.route_kernel`): which strategy hands
out the ordinals, how many pairs and warps a program takes, and who adds the counts.

:func:`plan_launch` is a small dispatch table measured on one H200 with
``benchmarks/bench_routing.py --sweep`` (every candidate plan at every size beside vLLM's
kernel); the constants below are its thresholds, each with the figures that set it. No tuning
happens at run time, so a launch inside a captured CUDA graph is the one planned at capture.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SINGLE_PROGRAM_PAIRS = 1024
"""Batches of at most this many pairs run as one program (up to 32 warps, one pair per thread):
no cross-program "last one clears" atomic on the critical path of small (decode) batches."""

MULTI_BLOCK = 256
"""Pairs per ``PAIRS`` program above ``AGGREGATE_ABOVE_PAIRS`` (8 warps). One pair per thread:
each pair's fetch-add waits for its reply before the next can use the result, so a thread
holding several pairs would pay those round trips one after another (4 pairs per thread
measured 1.1-3.7x slower on H200)."""

AGGREGATE_ABOVE_PAIRS = 8192
"""Above this many pairs ``PAIRS`` aggregates its atomics per warp (a hot expert's queue up at
one address) and the last program tallies every count from cleared counters; below it running
counters win, which need no tally (``bench_routing.py --sweep``, H200: at 4096 tokens aggregated
and tallied 4.7-6.4 us against 9.4-22 running, since running plans add every count per pair)."""

RUNNING_BLOCK = 128
"""Pairs per program of the running plans between ``SINGLE_PROGRAM_PAIRS`` and
``AGGREGATE_ABOVE_PAIRS`` pairs. Running counters need no arrival and no clear, so no program
waits for the last one (H200, 512 tokens, ``bench_routing.py --sweep``: E = 256-384 2.49-2.55 us
against 3.20-3.61 with cleared counters and vLLM's 3.44-3.69; blocks of 128 and 256 within
0.1 us, 512 up to 0.3 us slower)."""

AGGREGATE_RUNNING_UP_TO_EXPERTS = 64
"""Running plans over at most this many experts aggregate their fetch-adds per warp (few
experts: a hot expert's adds queue at one address; E = 64, 512 tokens: 2.84-3.25 us against
3.77-4.21 plain, vLLM 3.50-3.68). With E = 256-384 the match costs more than it saves (2.75-3.04
against 2.49-2.57)."""

SORTED_ABOVE_PAIRS = 65536
SORTED_UP_TO_EXPERTS = 64
"""Above ``SORTED_ABOVE_PAIRS`` pairs with at most ``SORTED_UP_TO_EXPERTS`` experts the sorted
blocks win (E = 64, 16384 tokens: 6.4-7.7 us against 8.8-13.0 aggregated); with more experts a
block holds nearly every expert once and its per-expert fetch-adds gain nothing (E = 384:
13.2-19.9 us against 9.5-10.5)."""

COUNTER_STRIDE = 32
"""int32s from one expert's counter to the next in launches of several programs: one counter per
128-byte line, so atomics on different experts' counters do not queue at one line (H200, 512
tokens, E = 64: 3.9-4.3 us against 4.2-4.9 packed). One program packs them (stride 1): its clear
is then E stores to a few lines (strided, 1-64 tokens took up to 0.5 us more at E = 384)."""

SORTED_MAX_EXPERTS = 4096
"""A ``SORTED`` program holds a vector of every expert's counter (and its sort keys,
``expert * block + position``, stay far inside int32)."""


class Strategy(enum.Enum):
    """How a launch hands out ordinals."""

    PAIRS = "pairs"
    """One fetch-add per pair (per group of a warp's lanes with ``LaunchPlan.aggregate``)."""
    SORTED = "sorted"
    """Each program sorts its block by expert: one fetch-add per expert present in the block."""


class Tally(enum.IntEnum):
    """Which counts the last program adds from the final counters instead of each program."""

    NONE = 0
    EXPERTS = 1
    """The expert counts (each counter is its expert's pairs in the batch)."""
    ALL = 2
    """The expert counts and each row entry's share of them as slot counts."""


@dataclass(frozen=True)
class LaunchPlan:
    """The launch of one batch: ``ceil(numel / block)`` programs of ``warps`` warps.

    ``PAIRS`` holds one pair per thread (``block == 32 * warps``); ``aggregate`` (compiled
    kernel only) is its option. ``tally`` applies where there are counters: ``PAIRS``, and
    ``SORTED`` with more than one program.
    """

    strategy: Strategy
    block: int
    warps: int
    aggregate: bool = False
    tally: Tally = Tally.NONE
    running: bool = False
    """``PAIRS`` without a tally: ordinals from int64 counters that run on from launch to
    launch (no arrival counter, no clear; see the kernel's module docstring)."""


def plan_launch(numel: int, num_experts: int) -> LaunchPlan:
    """The measured choice for ``numel`` pairs over ``num_experts`` experts (H200, thresholds
    above; the table is in docs/moe.md)."""
    if numel <= SINGLE_PROGRAM_PAIRS:
        block = max(32, 1 << (numel - 1).bit_length())
        return LaunchPlan(Strategy.PAIRS, block, block // 32)
    if numel <= AGGREGATE_ABOVE_PAIRS:
        aggregate = num_experts <= AGGREGATE_RUNNING_UP_TO_EXPERTS
        return LaunchPlan(
            Strategy.PAIRS, RUNNING_BLOCK, RUNNING_BLOCK // 32, aggregate=aggregate, running=True
        )
    if numel > SORTED_ABOVE_PAIRS and num_experts <= SORTED_UP_TO_EXPERTS:
        return LaunchPlan(Strategy.SORTED, 256, 8, tally=Tally.ALL)
    return LaunchPlan(
        Strategy.PAIRS, MULTI_BLOCK, MULTI_BLOCK // 32, aggregate=True, tally=Tally.ALL
    )


def check_plan(plan: LaunchPlan, num_experts: int) -> None:
    """Raise ValueError unless ``plan`` can run over ``num_experts`` experts."""
    block, warps = plan.block, plan.warps
    if block < 16 or block & (block - 1) or warps < 1 or warps > 32 or warps & (warps - 1):
        raise ValueError(f"plan needs a power-of-two block >= 16 and 1-32 warps, got {plan}")
    if plan.strategy is Strategy.PAIRS and block != 32 * warps:
        raise ValueError(f"a PAIRS plan holds one pair per thread (block = 32 * warps): {plan}")
    if plan.running and (plan.strategy is not Strategy.PAIRS or plan.tally is not Tally.NONE):
        raise ValueError(f"running counters need a PAIRS plan without a tally: {plan}")
    if plan.strategy is Strategy.SORTED and num_experts > SORTED_MAX_EXPERTS:
        raise ValueError(
            f"a SORTED plan holds all {num_experts} experts' counters in one program "
            f"(at most {SORTED_MAX_EXPERTS})"
        )
