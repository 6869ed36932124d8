"""ScaleRequest and RebalanceRequest: what a caller asks for, validated before anything changes.

A scale request names either the new world size (scale up appends ranks, scale down removes the highest
ranks) or the exact ordered member set of the next epoch (a subset of the current members, or the
current members followed by new ids). A rebalance request keeps the members and re-plans the
placement for the engine's load. :class:`ScaleLimits` holds what the model allows: every
logical expert needs a slot, and the preallocated placement buffers cap the physical slots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from elastic_ep.scaling.gate import GateMode

DEFAULT_TIMEOUT_S = 60.0


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_mode_and_timeout(mode: object, timeout: object) -> float:
    if not isinstance(mode, GateMode):
        raise TypeError(f"mode must be a GateMode, got {mode!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout_s must be a number, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout!r}")
    return float(timeout)


def _check_body(body: object, fields: set[str]) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise TypeError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = set(body) - fields
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    return body


def _mode_of(body: Mapping[str, Any]) -> GateMode:
    mode_name = body.get("mode", GateMode.DRAIN.value)
    try:
        return GateMode(mode_name)
    except ValueError:
        raise ValueError(f"mode must be 'drain' or 'reject', got {mode_name!r}") from None


@dataclass(frozen=True)
class ScaleLimits:
    """What world sizes the model can run at (slots per rank are constant across scale events).

    Attributes:
        num_logical: E, logical experts per layer; ``world_size * slots_per_rank >= E``.
        slots_per_rank: S, physical expert slots on each rank.
        max_physical_slots: capacity of the engine's ``PlacementBuffers`` (``ceil(factor * E)``);
            ``world_size * slots_per_rank`` must not exceed it.
    """

    num_logical: int
    slots_per_rank: int
    max_physical_slots: int

    def __post_init__(self) -> None:
        _check_int("num_logical", self.num_logical, 1)
        _check_int("slots_per_rank", self.slots_per_rank, 1)
        _check_int("max_physical_slots", self.max_physical_slots, self.num_logical)

    @property
    def min_world_size(self) -> int:
        return -(-self.num_logical // self.slots_per_rank)

    @property
    def max_world_size(self) -> int:
        return self.max_physical_slots // self.slots_per_rank

    def check_world_size(self, world_size: int) -> None:
        """Raise ``ValueError`` if ``world_size`` ranks cannot hold the model."""
        _check_int("world_size", world_size, 1)
        slots = world_size * self.slots_per_rank
        if slots < self.num_logical:
            raise ValueError(
                f"world_size {world_size} gives {slots} expert slots ({self.slots_per_rank} per "
                f"rank) < {self.num_logical} logical experts; the minimum is {self.min_world_size}"
            )
        if slots > self.max_physical_slots:
            raise ValueError(
                f"world_size {world_size} needs {slots} physical expert slots, above the "
                f"max-physical-expert capacity {self.max_physical_slots}; the maximum is "
                f"{self.max_world_size}"
            )


@dataclass(frozen=True)
class ScaleRequest:
    """A request to change the set of ranks.

    Attributes:
        world_size: the new number of ranks, or ``None`` when ``members`` is given.
        members: the exact ordered member ids of the next epoch, or ``None``.
        mode: what the traffic gate does with new work meanwhile.
        timeout_s: bound on the whole scale; past it the scale rolls back.
    """

    world_size: int | None = None
    members: tuple[int, ...] | None = None
    mode: GateMode = GateMode.DRAIN
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if (self.world_size is None) == (self.members is None):
            raise ValueError("give exactly one of world_size and members")
        if self.world_size is not None:
            _check_int("world_size", self.world_size, 1)
        if self.members is not None:
            if isinstance(self.members, (str, bytes)) or not hasattr(self.members, "__iter__"):
                raise TypeError(f"members must be a sequence of ints, got {self.members!r}")
            members = tuple(self.members)
            for m in members:
                _check_int("member id", m, 0)
            if not members:
                raise ValueError("members must not be empty")
            if len(set(members)) != len(members):
                raise ValueError(f"members has duplicate ids: {list(members)}")
            object.__setattr__(self, "members", members)
        object.__setattr__(self, "timeout_s", _check_mode_and_timeout(self.mode, self.timeout_s))

    @property
    def target_size(self) -> int:
        """Number of ranks after the scale."""
        return self.world_size if self.world_size is not None else len(self.members or ())

    def check(self, limits: ScaleLimits) -> None:
        """Raise ``ValueError`` if the model cannot run at the requested size."""
        limits.check_world_size(self.target_size)

    def next_members(self, current: tuple[int, ...], fresh_ids: range) -> tuple[int, ...]:
        """The ordered member ids of the next epoch.

        Args:
            current: member ids of the current epoch, in rank order.
            fresh_ids: ids to hand out to joiners of a ``world_size`` request.
        Raises ``ValueError`` for a member set that both adds and removes members, or that is
        the current world, or (for a ``world_size`` request) an unchanged size.
        """
        if self.members is None:
            size = self.target_size
            if size == len(current):
                raise ValueError(f"the world already has {size} ranks")
            if size < len(current):
                return current[:size]
            extra = size - len(current)
            if len(fresh_ids) < extra:
                raise ValueError(f"need {extra} new member ids, got {len(fresh_ids)}")
            return current + tuple(fresh_ids[:extra])
        new = self.members
        if new == current:
            raise ValueError(f"members {list(new)} are already the current world")
        old_set, new_set = set(current), set(new)
        if new_set <= old_set:
            if tuple(m for m in current if m in new_set) != new:
                raise ValueError("a shrinking member set must keep the current rank order")
            return new
        if new[: len(current)] == current:
            return new
        raise ValueError(
            f"members {list(new)} must be a subset of the current {list(current)} or the "
            "current members followed by new ids (one scale event adds or removes, not both)"
        )

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ScaleRequest:
        """Parse ``{"world_size": n, "mode": "drain"|"reject", "timeout_s": t}`` (or "members").

        Raises ``ValueError``/``TypeError`` naming the field at fault; unknown fields are errors.
        """
        body = _check_body(body, {"world_size", "members", "mode", "timeout_s"})
        mode = _mode_of(body)
        members = body.get("members")
        if members is not None and not isinstance(members, list):
            raise TypeError(f"members must be a list of ints, got {members!r}")
        return cls(
            world_size=body.get("world_size"),
            members=tuple(members) if members is not None else None,
            mode=mode,
            timeout_s=body.get("timeout_s", DEFAULT_TIMEOUT_S),
        )


@dataclass(frozen=True)
class RebalanceRequest:
    """A request to re-plan the placement at the same members (same ranks, same rank order).

    It runs like a scale (staged in the background, committed at one safe point, rolled back on
    any failure): the planner gets the engine's load, the serving placement as ``previous`` and
    the identity rank mapping, so it moves only what improves the balance.

    Attributes:
        mode: what the traffic gate does with new work meanwhile.
        timeout_s: bound on the whole rebalance; past it the rebalance rolls back.
    """

    mode: GateMode = GateMode.DRAIN
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "timeout_s", _check_mode_and_timeout(self.mode, self.timeout_s))

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RebalanceRequest:
        """Parse ``{"mode": "drain"|"reject", "timeout_s": t}`` (both optional).

        Raises ``ValueError``/``TypeError`` naming the field at fault; unknown fields are errors.
        """
        body = _check_body(body, {"mode", "timeout_s"})
        return cls(mode=_mode_of(body), timeout_s=body.get("timeout_s", DEFAULT_TIMEOUT_S))
