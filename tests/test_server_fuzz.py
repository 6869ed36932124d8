"""Property-based fuzz runs of the control endpoint against its OpenAPI description.

schemathesis generates requests from ``elastic_ep/scaling/openapi.json`` (bodies that fit the
schema and bodies that do not), each sent to a live :class:`ControlServer` on loopback with the
right token, no token or a wrong one. Every response must have a status the description lists
for that operation, a JSON body matching its schema, and never 5xx; and every rejected request
must leave the job's state untouched (nothing reaches the controller without the token).

Two runs: against the in-process controller of tests/test_server.py (many cases, fast), and
against a real :class:`ElasticCoordinator` whose gloo ranks run tests/launch_engine.py
(started as ``elastic-ep launch`` starts them) (fewer
cases: every accepted scale or rebalance really runs, and the test waits for its end). Bounded:
``max_examples`` per operation and generation mode, and the tests' timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from elastic_ep.launch import EntryLauncher
from elastic_ep.scaling import (
    ControlServer,
    ElasticCoordinator,
    ScaleLimits,
    ScalePhase,
    ScaleStatus,
)
from elastic_ep.scaling.server import openapi_description
from tests.test_server import TOKEN, Controller

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
AUTH = st.sampled_from(["right", "right", "none", "wrong"])


def _schema(max_examples: int) -> Any:
    schema = schemathesis.openapi.from_dict(openapi_description())
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=max_examples,
        with_security_parameters=False,  # the test picks the token: right, none or wrong
    )
    return schema


fast_schema = _schema(150)
live_schema = _schema(80)


class Tally:
    """What a run sent and got, printed at the end (``pytest -s`` shows it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.by_status: dict[int, int] = {}

        self.outcomes: dict[str, int] = {}

    def add(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def add_outcome(self, phase: ScalePhase) -> None:
        self.outcomes[phase.value] = self.outcomes.get(phase.value, 0) + 1

    def __str__(self) -> str:
        cases = sum(self.by_status.values())
        statuses = dict(sorted(self.by_status.items()))
        ended = f", accepted events ended {self.outcomes}" if self.outcomes else ""
        return f"fuzz {self.name}: {cases} cases, statuses {statuses}{ended}"


def _send(
    case: Any,
    auth: str,
    url: str,
    state: Callable[[], ScaleStatus],
    tally: Tally,
) -> tuple[int, ScaleStatus]:
    """Send ``case`` with the chosen token and check the answer; returns its status and the
    state before it (the state must be unchanged unless the request was accepted)."""
    headers = {"right": {"Authorization": f"Bearer {TOKEN}"}, "none": {}}.get(
        auth, {"Authorization": f"Bearer {TOKEN[::-1]}"}
    )
    before = state()
    response = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)
    tally.add(response.status_code)
    assert response.headers.get("content-type") == ["application/json"]
    assert isinstance(response.json(), dict)
    if response.status_code == 202:
        assert auth == "right" and case.method == "POST"
    else:
        assert state() == before, f"{case.method} {case.path} -> {response.status_code}"
    return response.status_code, before


@pytest.fixture(scope="module")
def fast() -> Any:
    ctl = Controller()
    tally = Tally("in-process controller")
    with ControlServer(ctl, token=TOKEN) as srv:
        yield srv, ctl, tally
    print(f"\n{tally}")


@pytest.mark.timeout(180)
@fast_schema.parametrize()
@fast_schema.given(auth=AUTH)
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_endpoint_against_its_description(case: Any, auth: str, fast: Any) -> None:
    srv, ctl, tally = fast
    submitted = ctl.submitted
    code, before = _send(case, auth, srv.url, lambda: ctl.state, tally)
    if code == 202:
        ctl.state = replace(before, phase=ScalePhase.IDLE)  # ready for the next case
    elif auth != "right" and case.method == "POST":
        assert ctl.submitted == submitted


@pytest.fixture(scope="module")
def coordinator() -> Any:
    launcher = EntryLauncher("tests.launch_engine:rank_main", "gloo", None)
    coord = ElasticCoordinator(launcher, ScaleLimits(4, 2, 8), timeout_s=30.0)
    tally = Tally("real coordinator, gloo ranks")
    try:
        coord.start(2, timeout_s=120)
        with ControlServer(coord, token=TOKEN) as srv:
            yield srv, coord, tally
    finally:
        coord.shutdown()
        print(f"\n{tally}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@live_schema.parametrize()
@live_schema.given(auth=AUTH)
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_live_job_against_its_description(case: Any, auth: str, coordinator: Any) -> None:
    srv, coord, tally = coordinator
    code, before = _send(case, auth, srv.url, coord.status, tally)
    if code == 202:
        final = coord.wait(120.0)
        tally.add_outcome(final.phase)
        # a tiny timeout_s rolls the event back: a valid outcome, and the old world serves on
        assert final.phase in (ScalePhase.COMPLETED, ScalePhase.ROLLED_BACK), final
        if final.phase is ScalePhase.ROLLED_BACK:
            assert final.members == before.members
