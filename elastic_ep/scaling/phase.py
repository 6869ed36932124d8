"""Phases of a scale event and the legal transitions between them (an explicit state machine)."""

from __future__ import annotations

from enum import Enum


class ScalePhase(Enum):
    """Where the job stands in a scale event (or a recovery after a rank died).

    The value is the name used on the wire (``GET /status``).
    """

    IDLE = "idle"
    PREPARING = "preparing"  # launching joiners, building the next epoch's groups as standby
    SYNCING_KV = "syncing_kv"  # MIN all-reduce of the KV budget on the new world group
    REBALANCING = "rebalancing"  # planning the placement and moving expert weights (staged)
    COMMITTING = "committing"  # the blocking part: switch groups, weights, resources
    RECOVERING = "recovering"  # a serving rank died: survivors shrink, reload lost experts
    COMPLETED = "completed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def is_active(self) -> bool:
        """True while a scale or a recovery is running (a new request must be rejected)."""
        return self in _ACTIVE

    @property
    def is_final(self) -> bool:
        """True in a state from which a new request may start."""
        return not self.is_active


_ACTIVE = frozenset(
    {
        ScalePhase.PREPARING,
        ScalePhase.SYNCING_KV,
        ScalePhase.REBALANCING,
        ScalePhase.COMMITTING,
        ScalePhase.RECOVERING,
    }
)

_FORWARD = {
    ScalePhase.PREPARING: ScalePhase.SYNCING_KV,
    ScalePhase.SYNCING_KV: ScalePhase.REBALANCING,
    ScalePhase.REBALANCING: ScalePhase.COMMITTING,
    ScalePhase.COMMITTING: ScalePhase.COMPLETED,
    ScalePhase.RECOVERING: ScalePhase.COMPLETED,
}


def can_transition(old: ScalePhase, new: ScalePhase) -> bool:
    """Whether ``old -> new`` is a legal step.

    Final states start a scale (``PREPARING``) or a recovery (``RECOVERING``); an active state
    moves to its successor or fails; a scale that failed is rolled back; a recovery may start
    from any state (a rank can die at any time).
    """
    if new is ScalePhase.RECOVERING:
        return True
    if old is ScalePhase.FAILED and new is ScalePhase.ROLLED_BACK:
        return True
    if old.is_final:
        return new is ScalePhase.PREPARING
    if new is ScalePhase.FAILED:
        return True
    return _FORWARD.get(old) is new


def check_transition(old: ScalePhase, new: ScalePhase) -> None:
    """Raise ``ValueError`` if ``old -> new`` is not a legal step."""
    if not can_transition(old, new):
        raise ValueError(f"illegal scale phase transition {old.value} -> {new.value}")
