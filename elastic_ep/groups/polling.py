"""Waiting on the host for device work, with a deadline and without a coarse sleep.

torch's ``Work.wait(timeout)`` on NCCL polls completion with a 1 ms sleep between polls, so every
rank leaves a barrier at its own point of that millisecond: on 4x H200 the ranks left one a
median 901 us apart, and a barrier in a loop took 1.11 ms; polled here, 41 us apart and 0.40 ms
(``benchmarks/bench_barrier.py``). Polling yields the core between polls (``sleep(0)``) for the
first :data:`SPIN_S`, which covers a healthy collective, then sleeps :data:`BACKOFF_S` per poll,
so a long wait for a slow peer does not keep a core busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable

SPIN_S = 0.005
"""Seconds of yield-only polling before backing off."""

BACKOFF_S = 50e-6
"""Sleep between polls after :data:`SPIN_S` (Linux wakes ~50-100 us later)."""


def wait_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Poll ``done()`` until it returns True (then True) or ``timeout_s`` passes (then False)."""
    started = time.monotonic()
    while not done():
        waited = time.monotonic() - started
        if waited > timeout_s:
            return False
        time.sleep(0 if waited < SPIN_S else BACKOFF_S)
    return True
