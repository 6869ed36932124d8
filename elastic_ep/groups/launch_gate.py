"""LaunchGate: one order of collective launches on every rank, for two threads that share a GPU.

Why it exists: a rank that stages the next epoch on a background thread (building its NCCL
communicator, syncing the KV budget, moving expert weights) while its serving thread runs the
forward pass over the current epoch's communicator has two threads launching NCCL kernels on one
GPU. NCCL promises progress to collectives of several communicators only when every rank
launches them in the same order; kernels of one GPU may run in launch order (NCCL's implicit
launch ordering), so rank A launching ``[stage op, forward all-to-all]`` while rank B launches
``[forward all-to-all, stage op]`` deadlocks both. Observed on 4x H200: the elastic demo's
scale-up hung in its KV-budget all-reduce.

The gate makes the order the same everywhere: the background thread's launch waits in
:meth:`LaunchGate.launch` until the serving thread, at a safe point that every rank reaches in
lockstep (``ElasticRank.poll``), calls :meth:`LaunchGate.grant`; the serving thread returns once
the launch was issued, so on every rank the stage op sits between the same two forward steps.
Only the launch is gated: waiting for the result happens outside, on the background thread.

States: ``GATED`` (launches wait for a grant), ``OPEN`` (launches pass: the background thread is
done, e.g. the serving thread now uses the group it built), ``CLOSED`` (launches fail at once:
the staging was abandoned).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

from elastic_ep.errors import ReconfigureError


class GateState(Enum):
    GATED = "gated"
    OPEN = "open"
    CLOSED = "closed"


class LaunchGate:
    """Hands launches from a background thread to a serving thread's safe points (thread-safe).

    Attributes:
        stalled_s: total seconds the serving thread spent in :meth:`grant` (no forward step ran
            meanwhile: count it as blocking time).
        grants: launches granted so far.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state = GateState.GATED
        self._closed_reason = ""
        self._waiting: str | None = None  # the launch the background thread waits to issue
        self._granted = False
        self.stalled_s = 0.0
        self.grants = 0

    @property
    def state(self) -> GateState:
        with self._cond:
            return self._state

    @property
    def pending(self) -> bool:
        """Whether a launch waits for a grant (stable until granted, the gate opens or closes)."""
        with self._cond:
            return self._waiting is not None and not self._granted

    @contextmanager
    def launch(self, what: str, timeout_s: float) -> Iterator[None]:
        """Background thread: run the body (one launch of ``what``) once the serving thread grants it.

        Raises ``ReconfigureError`` when no grant comes within ``timeout_s`` (the engine does not
        call ``poll``, or another rank's staging is stuck) or the gate is closed.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._state is GateState.GATED:
                self._waiting = what
                self._cond.notify_all()
                while not self._granted and self._state is GateState.GATED:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._waiting = None
                        raise ReconfigureError(
                            f"launch of {what} was not granted within {timeout_s:g} s: the "
                            "serving thread must call poll() between forward steps"
                        )
                    self._cond.wait(left)
            if self._state is GateState.CLOSED:
                self._waiting = None
                raise ReconfigureError(f"launch of {what} refused: {self._closed_reason}")
        try:
            yield
        finally:
            with self._cond:
                self._waiting = None
                self._granted = False
                self._cond.notify_all()

    def grant(self, timeout_s: float) -> bool:
        """Serving thread: let the waiting launch run; return once it was issued.

        Returns False (at once) when no launch waits. Waits at most ``timeout_s`` for the launch
        (a first NCCL collective also connects the communicator's peers).
        """
        start = time.monotonic()
        with self._cond:
            if self._waiting is None or self._granted or self._state is not GateState.GATED:
                return False
            self._granted = True
            self.grants += 1
            self._cond.notify_all()
            deadline = start + timeout_s
            while self._granted and self._state is GateState.GATED:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        self.stalled_s += time.monotonic() - start
        return True

    def open(self) -> None:
        """Let every later launch pass at once (the background thread issues no more)."""
        with self._cond:
            if self._state is GateState.GATED:
                self._state = GateState.OPEN
            self._cond.notify_all()

    def close(self, reason: str) -> None:
        """Fail the waiting launch and every later one with ``ReconfigureError(reason)``."""
        with self._cond:
            self._state = GateState.CLOSED
            self._closed_reason = reason
            self._cond.notify_all()
