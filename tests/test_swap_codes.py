"""The two-bit code table of the swap search (eplb/expert_bits.py: held now, held before)
against dense membership tests, through a sequence of swaps (several words per rank, the sign
bit of a word included); the swap search's large-block path against its plain one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import repair_swaps
from elastic_ep.eplb.expert_bits import before_codes, code_of, swap_codes, trade_codes
from elastic_ep.eplb.repair_swaps import _best_paid_swap, received_codes


def _table(rng: np.random.Generator, ranks: int, slots: int, experts: int) -> np.ndarray:
    """int64 [ranks, slots]: distinct experts per rank, some slots empty (-1)."""
    table = np.stack([rng.permutation(np.arange(-1, experts))[:slots] for _ in range(ranks)])
    return np.where(table < 0, -1, table).astype(np.int64)


def _holds(table: np.ndarray, experts: int) -> np.ndarray:
    """bool [ranks, E + 1]: whether each rank holds expert e (column e + 1; column 0: -1)."""
    every = np.arange(-1, experts)
    return (table[:, None, :] == every[None, :, None]).any(2) & (every >= 0)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(1, 200),
    st.integers(0, 8),
    st.integers(0, 2**16),
)
def test_codes_match_membership_through_swaps(
    ranks: int, slots: int, experts: int, swaps: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    kept = _table(rng, ranks, min(slots, experts + 1), experts)
    table = np.where(rng.random(kept.shape) < 0.5, kept, _table(rng, ranks, kept.shape[1], experts))
    table = np.stack([np.where(_repeats(row), -1, row) for row in table])
    codes = swap_codes(table, before_codes(kept, experts))
    before = _holds(kept, experts)
    before[:, 0] = True  # an empty slot counts as held before: it costs no transfer
    rank, expert = np.meshgrid(np.arange(ranks), np.arange(-1, experts), indexing="ij")
    for _ in range(swaps):
        # Rank a trades slot i with rank b's slot j where neither then holds an expert twice.
        a, b = rng.choice(ranks, 2) if ranks > 1 else (0, 0)
        i, j = rng.integers(table.shape[1], size=2)
        x, y = table[a, i], table[b, j]
        held = _holds(table, experts)
        if a == b or (x >= 0 and held[b, x + 1]) or (y >= 0 and held[a, y + 1]):
            continue
        trade_codes(codes, np.array([a]), np.array([b]), np.array([x]), np.array([y]))
        table[a, i], table[b, j] = y, x
    want = _holds(table, experts) + 2 * before
    assert np.array_equal(code_of(codes, rank, expert), want)
    received = (table >= 0) & ~np.take_along_axis(before, table + 1, 1)
    assert np.array_equal(received_codes(codes, table), received)


def _repeats(row: np.ndarray) -> np.ndarray:
    """bool [S]: entries of ``row`` equal to an earlier one (not empty)."""
    return np.array([row[i] >= 0 and row[i] in row[:i] for i in range(row.size)])


@pytest.mark.parametrize("seed", range(20))
def test_wide_blocks_choose_the_same_swaps(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks whose operands are repeated over the slots first (large ones) choose what the
    plain broadcasts choose, bit for bit."""
    rng = np.random.default_rng(seed)
    ranks, per_rank = int(rng.integers(4, 40)), int(rng.integers(2, 7))
    experts = int(rng.integers(per_rank + 1, 140))
    slots = _table(rng, ranks, per_rank, experts)
    kept = _table(rng, ranks, per_rank, experts)
    weight = np.where(slots >= 0, rng.integers(0, 4, slots.shape) / 4.0, 0.0)  # ties
    loads = weight.sum(1)
    count = int(rng.integers(1, ranks // 2 + 1))
    partner = rng.choice(ranks, (count, int(rng.integers(1, 5))))
    heavy, left = rng.permutation(ranks)[:count], rng.integers(-1, 4, count)
    codes = swap_codes(slots, before_codes(kept, experts))
    bits = (codes, received_codes(codes, slots))
    work = np.empty((2, count * per_rank * partner.shape[1] * per_rank))
    results = []
    for wide in (0, 1 << 30):
        monkeypatch.setattr(repair_swaps, "WIDE_CANDIDATES", wide)
        results.append(_best_paid_swap(slots, weight, loads, bits, heavy, partner, left, work))
    for narrow, wide_one in zip(*results, strict=True):
        assert np.array_equal(narrow, wide_one)
