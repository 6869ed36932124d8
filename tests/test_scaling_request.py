"""Scale requests, limits, phases and status: validation before anything changes."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.scaling import (
    GateMode,
    RebalanceRequest,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
    can_transition,
    check_transition,
)
from elastic_ep.scaling.status import EventKind

LIMITS = ScaleLimits(num_logical=8, slots_per_rank=4, max_physical_slots=16)  # 2..4 ranks


def test_from_json_defaults_and_fields() -> None:
    req = ScaleRequest.from_json({"world_size": 3, "mode": "reject", "timeout_s": 5})
    assert (req.world_size, req.mode, req.timeout_s) == (3, GateMode.REJECT, 5.0)
    assert ScaleRequest.from_json({"world_size": 2}).mode is GateMode.DRAIN
    assert ScaleRequest.from_json({"members": [0, 1]}).members == (0, 1)


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ({"world_size": 2.5}, TypeError, "world_size must be an int"),
        ({"world_size": "3"}, TypeError, "world_size must be an int"),
        ({"world_size": True}, TypeError, "world_size must be an int"),
        ({"world_size": 0}, ValueError, "world_size must be >= 1"),
        ({"world_size": -2}, ValueError, "world_size must be >= 1"),
        ({}, ValueError, "exactly one of world_size and members"),
        ({"world_size": 2, "members": [0, 1]}, ValueError, "exactly one"),
        ({"world_size": 2, "mode": "fast"}, ValueError, "mode must be 'drain' or 'reject'"),
        ({"world_size": 2, "timeout_s": 0}, ValueError, "timeout_s must be a positive"),
        ({"world_size": 2, "timeout_s": float("inf")}, ValueError, "timeout_s"),
        ({"world_size": 2, "timeout_s": "5"}, TypeError, "timeout_s must be a number"),
        ({"world_size": 2, "colour": 1}, ValueError, "unknown fields"),
        ({"members": [0, 0]}, ValueError, "duplicate"),
        ({"members": "01"}, TypeError, "members must be a list"),
        ([2], TypeError, "JSON object"),
    ],
)
def test_bad_json_is_a_clear_error(body: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ScaleRequest.from_json(body)  # type: ignore[arg-type]


def test_limits() -> None:
    assert (LIMITS.min_world_size, LIMITS.max_world_size) == (2, 4)
    ScaleRequest(world_size=4).check(LIMITS)
    with pytest.raises(ValueError, match="max-physical-expert capacity 16"):
        ScaleRequest(world_size=5).check(LIMITS)
    with pytest.raises(ValueError, match="< 8 logical experts"):
        ScaleRequest(world_size=1).check(LIMITS)
    with pytest.raises(ValueError, match="max_physical_slots"):
        ScaleLimits(8, 4, 7)


def test_next_members() -> None:
    cur = (0, 1, 2)
    assert ScaleRequest(world_size=5).next_members(cur, range(7, 20)) == (0, 1, 2, 7, 8)
    assert ScaleRequest(world_size=1).next_members(cur, range(7, 20)) == (0,)
    assert ScaleRequest(members=(0, 2)).next_members(cur, range(7, 20)) == (0, 2)
    assert ScaleRequest(members=(0, 1, 2, 9)).next_members(cur, range(7, 20)) == (0, 1, 2, 9)
    with pytest.raises(ValueError, match="already has 3 ranks"):
        ScaleRequest(world_size=3).next_members(cur, range(7, 20))
    with pytest.raises(ValueError, match="adds or removes, not both"):
        ScaleRequest(members=(0, 1, 9)).next_members(cur, range(7, 20))
    with pytest.raises(ValueError, match="keep the current rank order"):
        ScaleRequest(members=(2, 0)).next_members(cur, range(7, 20))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8))
def test_resize_keeps_survivors_in_order(old: int, new: int) -> None:
    cur = tuple(range(10, 10 + old))
    req = ScaleRequest(world_size=new)
    if old == new:
        with pytest.raises(ValueError):
            req.next_members(cur, range(100, 200))
        return
    got = req.next_members(cur, range(100, 200))
    assert len(got) == new and len(set(got)) == new
    keep = min(old, new)
    assert got[:keep] == cur[:keep]
    assert all(m >= 100 for m in got[keep:])


def test_phase_machine() -> None:
    path = [
        ScalePhase.IDLE,
        ScalePhase.PREPARING,
        ScalePhase.SYNCING_KV,
        ScalePhase.REBALANCING,
        ScalePhase.COMMITTING,
        ScalePhase.COMPLETED,
        ScalePhase.PREPARING,
        ScalePhase.FAILED,
        ScalePhase.ROLLED_BACK,
        ScalePhase.PREPARING,
        ScalePhase.RECOVERING,
        ScalePhase.COMPLETED,
    ]
    for a, b in itertools.pairwise(path):
        check_transition(a, b)
    with pytest.raises(ValueError, match="illegal scale phase transition idle -> committing"):
        check_transition(ScalePhase.IDLE, ScalePhase.COMMITTING)
    assert not can_transition(ScalePhase.PREPARING, ScalePhase.PREPARING)  # no interleaving
    assert not can_transition(ScalePhase.COMPLETED, ScalePhase.ROLLED_BACK)


@given(st.sampled_from(list(ScalePhase)), st.sampled_from(list(ScalePhase)))
def test_active_phases_never_start_a_second_scale(a: ScalePhase, b: ScalePhase) -> None:
    if a.is_active and b is ScalePhase.PREPARING:
        assert not can_transition(a, b)
    if can_transition(a, b) and b is ScalePhase.ROLLED_BACK:
        assert a is ScalePhase.FAILED


def test_status_json() -> None:
    st_ = ScaleStatus(
        ScalePhase.COMPLETED,
        3,
        (0, 1),
        EventKind.SCALE,
        2,
        ((ScalePhase.PREPARING, 0.5),),
        0.01,
        1024,
        0,
        (),
        None,
    )
    out = json.loads(json.dumps(st_.to_json()))
    assert out["phase"] == "completed" and out["world_size"] == 2
    assert out["phase_s"] == {"preparing": 0.5}


def test_rebalance_request_json() -> None:
    assert RebalanceRequest.from_json({}) == RebalanceRequest(GateMode.DRAIN, 60.0)
    req = RebalanceRequest.from_json({"mode": "reject", "timeout_s": 5})
    assert (req.mode, req.timeout_s) == (GateMode.REJECT, 5.0)


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        ({"world_size": 2}, ValueError, "unknown fields"),
        ({"mode": "fast"}, ValueError, "mode must be 'drain' or 'reject'"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be a positive"),
        ({"timeout_s": True}, TypeError, "timeout_s must be a number"),
        ([], TypeError, "JSON object"),
    ],
)
def test_bad_rebalance_json_is_a_clear_error(
    body: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        RebalanceRequest.from_json(body)  # type: ignore[arg-type]


def test_rebalance_status_json() -> None:
    st_ = ScaleStatus(
        ScalePhase.COMPLETED,
        4,
        (0, 1),
        EventKind.REBALANCE,
        3,
        balance_before=0.8,
        balance_after=0.95,
        experts_moved=6,
    )
    out = json.loads(json.dumps(st_.to_json()))
    assert out["event"] == "rebalance"
    assert (out["balance_before"], out["balance_after"], out["experts_moved"]) == (0.8, 0.95, 6)
    assert EventKind.REBALANCE.is_requested and not EventKind.RECOVERY.is_requested
