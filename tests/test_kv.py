"""KV budget sync: MIN over known budgets in real processes; unknown ranks; bad values are
rejected before any collective."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.kv import UNKNOWN, KVBudgetUnknownError, kv_blocks_for_budget, sync_kv_budget
from tests.procs import run_ranks

_BAD = [True, np.bool_(False), -5, -2, 3.5, "10", 2**63 - 1, 2**70]


def _sync(rank: int, world_size: int, port: int) -> dict[str, object]:
    rdzv = Rendezvous("127.0.0.1", port, is_master=False, timeout_s=20)
    g = StatelessGroup(rdzv, "kv", 0, rank, world_size, timeout_s=5)
    out: dict[str, object] = {}
    mixed: list[int | None] = [7_000, None, UNKNOWN, 9_000]
    out["mixed"] = sync_kv_budget(g, mixed[rank])
    out["numpy"] = sync_kv_budget(g, np.int64(100 + rank))
    try:
        sync_kv_budget(g, None if rank % 2 else UNKNOWN)
    except KVBudgetUnknownError as err:
        out["all_unknown"] = str(err)
    # Rank 1 tries every bad value first. Had any of them entered a collective, it would pair
    # with the other ranks' next call and rank 1's valid call below would then hang (timeout).
    if rank == 1:
        out["bad"] = []
        for value in _BAD:
            try:
                sync_kv_budget(g, value)  # type: ignore[arg-type]
            except (TypeError, ValueError) as err:
                out["bad"].append(type(err).__name__)  # type: ignore[attr-defined]
    out["after_bad"] = sync_kv_budget(g, 500 + rank)
    g.destroy()
    return out


def test_sync_kv_budget_in_processes() -> None:
    outs = run_ranks(_sync, 4, timeout=60)
    for out in outs:
        assert out["mixed"] == 7_000
        assert out["numpy"] == 100
        assert "no rank of group 'kv'" in out["all_unknown"]
        assert out["after_bad"] == 500
    assert outs[1]["bad"] == [
        "TypeError", "TypeError", "ValueError", "ValueError",
        "TypeError", "TypeError", "ValueError", "ValueError",
    ]  # fmt: skip


def test_sync_kv_budget_rejects_a_non_group() -> None:
    with pytest.raises(TypeError, match="StatelessGroup"):
        sync_kv_budget(object(), 5)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def solo() -> StatelessGroup:
    rdzv = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    g = StatelessGroup(rdzv, "solo", 0, 0, 1, timeout_s=5)
    yield g
    g.destroy()
    rdzv.close()


@given(st.integers(min_value=0, max_value=2**63 - 2))
def test_single_rank_budget_is_its_own(solo: StatelessGroup, value: int) -> None:
    assert sync_kv_budget(solo, value) == value


@given(st.integers(min_value=0, max_value=2**62), st.integers(min_value=1, max_value=2**40))
def test_blocks_for_budget_is_floor(budget: int, block: int) -> None:
    blocks = kv_blocks_for_budget(budget, block)
    assert blocks * block <= budget < (blocks + 1) * block


@pytest.mark.parametrize(
    ("budget", "block", "exc"),
    [(-1, 4, ValueError), (4, 0, ValueError), (4, -3, ValueError), (True, 4, TypeError),
     (4, 2.0, TypeError), ("4", 4, TypeError)],
)  # fmt: skip
def test_blocks_for_budget_bad_input(budget: object, block: object, exc: type) -> None:
    with pytest.raises(exc):
        kv_blocks_for_budget(budget, block)  # type: ignore[arg-type]


def test_zero_budget_means_zero_blocks(solo: StatelessGroup) -> None:
    assert kv_blocks_for_budget(sync_kv_budget(solo, 0), 16) == 0
