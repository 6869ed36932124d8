"""LaunchGate: a background thread's launches run only inside the serving thread's grants."""

from __future__ import annotations

import threading
import time

import pytest

from elastic_ep.errors import ReconfigureError
from elastic_ep.groups import GateState, LaunchGate


def _background(gate: LaunchGate, ops: int, log: list[str], errors: list[BaseException]) -> None:
    try:
        for i in range(ops):
            with gate.launch(f"op{i}", timeout_s=5.0):
                log.append(f"launch {i}")
                time.sleep(0.002)  # the launch takes a while: grant() must wait for it
    except BaseException as exc:
        errors.append(exc)


def _wait_pending(gate: LaunchGate) -> None:
    deadline = time.monotonic() + 5.0
    while not gate.pending:
        assert time.monotonic() < deadline, "the background thread never asked to launch"
        time.sleep(0.001)


def test_launches_run_only_inside_grants_in_the_serving_threads_order() -> None:
    gate, log, errors = LaunchGate(), [], []
    thread = threading.Thread(target=_background, args=(gate, 3, log, errors))
    thread.start()
    for step in range(3):
        _wait_pending(gate)
        log.append(f"step {step}")  # a forward step while the launch waits: nothing launched yet
        assert gate.grant(timeout_s=5.0)
        assert log[-1] == f"launch {step}"  # grant returned after the launch, not before
    thread.join(5.0)
    assert not errors
    assert log == ["step 0", "launch 0", "step 1", "launch 1", "step 2", "launch 2"]
    assert gate.grants == 3 and gate.stalled_s >= 3 * 0.002
    assert not gate.grant(timeout_s=1.0)  # nothing waits: returns at once


def test_a_launch_nobody_grants_times_out_naming_poll() -> None:
    gate = LaunchGate()
    start = time.monotonic()
    waiting = gate.launch("all_reduce on group 'world' epoch 3", timeout_s=0.2)
    with pytest.raises(ReconfigureError, match=r"not granted within 0.2 s.*poll\(\)"), waiting:
        pytest.fail("the body must not run without a grant")
    assert 0.2 <= time.monotonic() - start < 2.0
    assert not gate.pending  # a later poll finds nothing to grant


def test_close_fails_the_waiting_launch_and_every_later_one() -> None:
    gate, log, errors = LaunchGate(), [], []
    thread = threading.Thread(target=_background, args=(gate, 2, log, errors))
    thread.start()
    _wait_pending(gate)
    gate.close("the scale rolled back")
    thread.join(5.0)
    assert not thread.is_alive() and log == []
    assert len(errors) == 1 and "the scale rolled back" in str(errors[0])
    assert gate.state is GateState.CLOSED
    with pytest.raises(ReconfigureError, match="rolled back"), gate.launch("op", timeout_s=5.0):
        pass
    assert not gate.grant(timeout_s=1.0)


def test_open_lets_launches_pass_without_a_grant() -> None:
    gate, log, errors = LaunchGate(), [], []
    thread = threading.Thread(target=_background, args=(gate, 1, log, errors))
    thread.start()
    _wait_pending(gate)
    gate.open()  # e.g. the staging finished and the serving thread now owns the group
    thread.join(5.0)
    assert not errors and log == ["launch 0"]
    with gate.launch("commit all_reduce", timeout_s=0.1):
        log.append("commit")
    assert log == ["launch 0", "commit"] and gate.grants == 0
