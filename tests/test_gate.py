"""TrafficGate: drain waits (bounded), reject fails fast with a retry hint, counts stay exact."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.errors import ScalingInProgress
from elastic_ep.scaling import GateMode, TrafficGate


def test_open_gate_counts_work() -> None:
    gate = TrafficGate()
    with gate.admitted():
        assert gate.in_flight == 1
    assert gate.in_flight == 0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        gate.leave()


def test_reject_fails_at_once_with_hint() -> None:
    gate = TrafficGate()
    gate.close(GateMode.REJECT, retry_after_s=7.5)
    start = time.monotonic()
    with pytest.raises(ScalingInProgress, match=r"retry in about 7\.5 s") as err:
        gate.enter(wait_s=5.0)
    assert err.value.retry_after_s == 7.5
    assert time.monotonic() - start < 0.5
    assert gate.in_flight == 0
    gate.open()
    with gate.admitted():
        pass


def test_drain_holds_new_work_until_open() -> None:
    gate = TrafficGate()
    gate.close(GateMode.DRAIN, retry_after_s=1.0)
    threading.Timer(0.2, gate.open).start()
    start = time.monotonic()
    gate.enter(wait_s=5.0)
    assert 0.15 < time.monotonic() - start < 3.0
    assert gate.in_flight == 1
    gate.leave()


def test_drain_wait_is_bounded() -> None:
    gate = TrafficGate()
    gate.close(GateMode.DRAIN, retry_after_s=1.0)
    start = time.monotonic()
    with pytest.raises(ScalingInProgress):
        gate.enter(wait_s=0.2)
    assert time.monotonic() - start < 2.0


def test_wait_drained() -> None:
    gate = TrafficGate()
    gate.enter()
    assert not gate.wait_drained(0.05)
    threading.Timer(0.1, gate.leave).start()
    assert gate.wait_drained(5.0)


def test_bad_arguments() -> None:
    gate = TrafficGate()
    with pytest.raises(TypeError, match="GateMode"):
        gate.close("drain", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_after_s"):
        gate.close(GateMode.REJECT, -1.0)
    with pytest.raises(ValueError, match="wait_s"):
        gate.enter(wait_s=-1)
    assert gate.closed_mode is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["enter", "leave", "drain", "reject", "open"]), max_size=40))
def test_in_flight_is_enters_minus_leaves(ops: list[str]) -> None:
    gate, expected = TrafficGate(), 0
    for op in ops:
        if op == "enter":
            try:
                gate.enter()
                expected += 1
            except ScalingInProgress:
                assert gate.closed_mode is not None
        elif op == "leave" and expected:
            gate.leave()
            expected -= 1
        elif op in ("drain", "reject"):
            gate.close(GateMode(op), 0.0)
        elif op == "open":
            gate.open()
        assert gate.in_flight == expected >= 0
