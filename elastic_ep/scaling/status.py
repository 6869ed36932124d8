"""ScaleStatus: what the coordinator reports (``GET /status``), and the per-phase stopwatch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from elastic_ep.scaling.phase import ScalePhase


class EventKind(Enum):
    """What changed the world last."""

    SCALE = "scale"  # a scale request
    REBALANCE = "rebalance"  # a rebalance request (same members, new placement)
    RECOVERY = "recovery"  # a serving rank died

    @property
    def is_requested(self) -> bool:
        """True for the events a caller asks for (one at a time; they roll back on failure)."""
        return self is not EventKind.RECOVERY


@dataclass(frozen=True)
class ScaleStatus:
    """Snapshot of the job's elastic state.

    Attributes:
        phase: current (or last) phase.
        epoch: the epoch now serving.
        members: member ids of the serving epoch, in rank order.
        event: what the last (or running) event was, ``None`` before the first.
        event_id: a number that grows with every event.
        phase_s: seconds spent in each phase of the last event, in order.
        blocking_s: the longest time any rank could not run a forward step (last event).
        kv_budget_bytes: KV-cache budget agreed by the new world (last scale or rebalance).
        lost_experts: (layer, expert) pairs reloaded because every replica died (last recovery).
        dead_members: member ids lost in the last recovery.
        error: why the last event failed, ``None`` if it did not.
        balance_before / balance_after: balancedness (mean / max rank load, averaged over
            layers; 1.0 is perfect) of the placement before and after the last scale or
            rebalance, under the load it was planned for; ``None`` when unknown.
        experts_moved: expert weights received over the network by all ranks (last scale or
            rebalance), ``None`` when unknown.
    """

    phase: ScalePhase
    epoch: int
    members: tuple[int, ...]
    event: EventKind | None = None
    event_id: int = 0
    phase_s: tuple[tuple[ScalePhase, float], ...] = ()
    blocking_s: float | None = None
    kv_budget_bytes: int | None = None
    lost_experts: int = 0
    dead_members: tuple[int, ...] = ()
    error: str | None = None
    balance_before: float | None = None
    balance_after: float | None = None
    experts_moved: int | None = None

    @property
    def world_size(self) -> int:
        return len(self.members)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (enums by value)."""
        return {
            "phase": self.phase.value,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "members": list(self.members),
            "event": None if self.event is None else self.event.value,
            "event_id": self.event_id,
            "phase_s": {p.value: round(s, 6) for p, s in self.phase_s},
            "blocking_s": self.blocking_s,
            "kv_budget_bytes": self.kv_budget_bytes,
            "balance_before": self.balance_before,
            "balance_after": self.balance_after,
            "experts_moved": self.experts_moved,
            "lost_experts": self.lost_experts,
            "dead_members": list(self.dead_members),
            "error": self.error,
        }


@dataclass
class PhaseClock:
    """Records how long each phase lasted (monotonic clock)."""

    phases: list[tuple[ScalePhase, float]] = field(default_factory=list)
    _current: ScalePhase | None = None
    _since: float = 0.0

    def enter(self, phase: ScalePhase) -> None:
        """Close the running phase (if any) and start ``phase``."""
        now = time.monotonic()
        if self._current is not None:
            self.phases.append((self._current, now - self._since))
        self._current, self._since = phase, now

    def stop(self) -> tuple[tuple[ScalePhase, float], ...]:
        """Close the running phase and return every phase's duration."""
        if self._current is not None:
            self.phases.append((self._current, time.monotonic() - self._since))
            self._current = None
        return tuple(self.phases)
