"""wait_until: the host-side poll behind NCCL's synchronising calls and the executor's check."""

from __future__ import annotations

import time

from elastic_ep.groups.polling import SPIN_S, wait_until


def test_returns_true_once_done_in_the_spin_and_after_the_backoff() -> None:
    for delay in (SPIN_S / 5, 3 * SPIN_S):
        ready_at = time.monotonic() + delay
        assert wait_until(lambda ready_at=ready_at: time.monotonic() >= ready_at, timeout_s=5.0)
        assert time.monotonic() >= ready_at


def test_returns_false_after_the_timeout() -> None:
    calls = []
    started = time.monotonic()
    assert not wait_until(lambda: calls.append(1) is not None, timeout_s=0.05)
    assert time.monotonic() - started >= 0.05
    assert len(calls) > 1  # it polled more than once before giving up


def test_done_at_once_does_not_wait() -> None:
    assert wait_until(lambda: True, timeout_s=0.0)
