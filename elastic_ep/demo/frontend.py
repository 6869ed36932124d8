"""A rank's front end: requests arrive on a thread and pass the traffic gate into the engine.

Requests arrive at a fixed rate whatever the engine does, as they would from clients. Each one
enters the rank's :class:`~elastic_ep.scaling.TrafficGate`: while a scale runs in ``REJECT`` mode
it is refused at once; in ``DRAIN`` mode it waits at the gate (``held``) until the scale commits.
Admitted requests queue for the engine, which keeps each in its batch for a few forward steps and
then finishes it. Counters are cumulative; the controller takes differences per event.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass

from elastic_ep.errors import ScalingInProgress
from elastic_ep.scaling import GateMode, TrafficGate


@dataclass
class RequestCounts:
    """Cumulative request counts of one rank.

    Attributes:
        arrived: requests that reached the front end.
        admitted: passed the gate.
        held: admitted after waiting at a gate closed in drain mode.
        rejected: refused by the gate (reject mode, or a drain wait that ran out).
        served: finished by the engine.
        drained: finished while the gate was closed in drain mode (a scale waited for them).
        lost: in flight when the rank left or died.
        in_flight: admitted and not finished now.
        tokens: token-steps run by the engine.
    """

    arrived: int = 0
    admitted: int = 0
    held: int = 0
    rejected: int = 0
    served: int = 0
    drained: int = 0
    lost: int = 0
    in_flight: int = 0
    tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Request:
    """One admitted request: how many more forward steps it stays in the batch."""

    remaining_steps: int


class FrontEnd:
    """Arrivals on a daemon thread; the engine takes admitted requests between steps.

    Args:
        gate: the rank's traffic gate (shared with its ``ElasticRank``).
        requests_per_s: arrival rate.
        decode_steps: forward steps each request stays in the batch.
        drain_wait_s: longest wait at a gate closed in drain mode.
    """

    def __init__(
        self, gate: TrafficGate, requests_per_s: float, decode_steps: int, drain_wait_s: float
    ) -> None:
        if not requests_per_s > 0:
            raise ValueError(f"requests_per_s must be > 0, got {requests_per_s!r}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        self._gate = gate
        self._interval = 1.0 / requests_per_s
        self._decode_steps = decode_steps
        self._drain_wait_s = drain_wait_s
        self._lock = threading.Lock()
        self._queue: collections.deque[Request] = collections.deque()
        self._counts = RequestCounts()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._arrivals, name="demo-frontend", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the arrivals (bounded wait for the thread)."""
        self._stop.set()
        self._thread.join(timeout=self._drain_wait_s + 1.0)

    def _arrivals(self) -> None:
        due = time.monotonic()
        opened_at = 0.0  # when a drain wait last ended: requests due before it waited too
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            with self._lock:
                self._counts.arrived += 1
            waited = due < opened_at
            if self._gate.closed_mode is GateMode.DRAIN:
                waited = True
            try:
                self._gate.enter(self._drain_wait_s)
            except ScalingInProgress:
                with self._lock:
                    self._counts.rejected += 1
            else:
                if waited:
                    opened_at = max(opened_at, time.monotonic())
                with self._lock:
                    self._counts.admitted += 1
                    self._counts.held += int(waited)
                    self._counts.in_flight += 1
                    self._queue.append(Request(self._decode_steps))
            due += self._interval

    def take(self, limit: int) -> list[Request]:
        """Up to ``limit`` admitted requests, oldest first."""
        with self._lock:
            count = min(limit, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    def ran(self, tokens: int) -> None:
        """Count ``tokens`` token-steps run by one forward step."""
        with self._lock:
            self._counts.tokens += tokens

    def finish(self, request: Request) -> None:
        """The engine finished ``request``: it leaves the gate."""
        draining = self._gate.closed_mode is GateMode.DRAIN
        with self._lock:
            self._counts.served += 1
            self._counts.drained += int(draining)
            self._counts.in_flight -= 1
        self._gate.leave()

    def drop_all(self, active: list[Request]) -> None:
        """The rank leaves: ``active`` and the queued requests are lost."""
        with self._lock:
            dropped = len(active) + len(self._queue)
            self._queue.clear()
            self._counts.lost += dropped
            self._counts.in_flight -= dropped
        for _ in range(dropped):
            self._gate.leave()

    def counts(self) -> RequestCounts:
        """A copy of the counters."""
        with self._lock:
            return RequestCounts(**self._counts.as_dict())
