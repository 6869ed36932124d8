"""The multi-process harness itself: results, errors and deadlines are reported, never hung."""

import os
import signal
import time

import pytest

from tests.procs import RankFailed, run_ranks


def _echo(rank: int, world_size: int, port: int, scale: int) -> int:
    return rank * scale + world_size


def _fail_on_one(rank: int, world_size: int, port: int) -> None:
    if rank == 1:
        raise ValueError("boom")


def _sleep(rank: int, world_size: int, port: int) -> None:
    time.sleep(60)


def _die(rank: int, world_size: int, port: int) -> int:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_results_in_rank_order() -> None:
    assert run_ranks(_echo, 3, 10) == [3, 13, 23]


def test_error_is_reported() -> None:
    with pytest.raises(RankFailed, match="boom"):
        run_ranks(_fail_on_one, 2)


def test_deadline_kills() -> None:
    start = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish"):
        run_ranks(_sleep, 2, timeout=2)
    assert time.monotonic() - start < 15


def test_expected_death() -> None:
    assert run_ranks(_die, 2, expect_dead=[0]) == [None, 1]
    with pytest.raises(RankFailed, match="died"):
        run_ranks(_die, 2)
