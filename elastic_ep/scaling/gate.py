"""TrafficGate: what happens to the engine's requests while the world changes size.

The engine wraps each unit of work (a request, a batch) in :meth:`TrafficGate.admitted`. While a
scale runs the gate is closed in one of two modes, chosen per scale request:

- ``DRAIN``: new work waits at the gate (up to its own wait limit) until the scale ends, and the
  scale waits (up to its timeout) for the work already in flight to finish before it commits.
  Clients see latency, not errors.
- ``REJECT``: new work fails at once with :class:`~elastic_ep.errors.ScalingInProgress` carrying a
  retry hint; work in flight keeps running and only pauses during the blocking commit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from elastic_ep.errors import ScalingInProgress


class GateMode(Enum):
    """How the gate treats new work while a scale runs."""

    DRAIN = "drain"
    REJECT = "reject"


class TrafficGate:
    """Thread-safe admission control for one engine (one rank's front end).

    Every wait is bounded. ``closed_mode`` is ``None`` while the gate is open.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_flight = 0
        self._mode: GateMode | None = None
        self._retry_after_s = 0.0

    @property
    def in_flight(self) -> int:
        """Number of units of work admitted and not yet finished."""
        with self._cond:
            return self._in_flight

    @property
    def closed_mode(self) -> GateMode | None:
        with self._cond:
            return self._mode

    def close(self, mode: GateMode, retry_after_s: float) -> None:
        """Stop admitting new work (idempotent; a second close updates mode and hint)."""
        if not isinstance(mode, GateMode):
            raise TypeError(f"mode must be a GateMode, got {mode!r}")
        if not retry_after_s >= 0:
            raise ValueError(f"retry_after_s must be >= 0, got {retry_after_s!r}")
        with self._cond:
            self._mode = mode
            self._retry_after_s = float(retry_after_s)

    def open(self) -> None:
        """Admit work again and wake every waiter (idempotent)."""
        with self._cond:
            self._mode = None
            self._cond.notify_all()

    def enter(self, wait_s: float = 0.0) -> None:
        """Admit one unit of work or raise ``ScalingInProgress``.

        Args:
            wait_s: in ``DRAIN`` mode, how long to wait for the gate to open before giving up.
                ``REJECT`` mode never waits.
        """
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s!r}")
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._mode is GateMode.DRAIN:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._mode is not None:
                raise ScalingInProgress(
                    f"the engine is scaling (gate mode {self._mode.value}); "
                    f"retry in about {self._retry_after_s:.1f} s",
                    retry_after_s=self._retry_after_s,
                )
            self._in_flight += 1

    def leave(self) -> None:
        """Mark one admitted unit of work as finished."""
        with self._cond:
            if self._in_flight == 0:
                raise RuntimeError("TrafficGate.leave() without a matching enter()")
            self._in_flight -= 1
            self._cond.notify_all()

    @contextmanager
    def admitted(self, wait_s: float = 0.0) -> Iterator[None]:
        """``with gate.admitted(): run_request()`` — enter, and leave even on error."""
        self.enter(wait_s)
        try:
            yield
        finally:
            self.leave()

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no work is in flight; return whether that happened within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True
