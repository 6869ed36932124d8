"""Property-based fuzz run of the control endpoint against its OpenAPI description.

schemathesis generates requests from ``elastic_ep/scaling/openapi.json`` (bodies that fit the
schema and bodies that do not), each sent to a live :class:`ControlServer` on loopback with the
right token, no token or a wrong one. Every response must have a status the description lists
for that operation, a JSON body matching its schema, and never 5xx; and every rejected request
must leave the job's state untouched (nothing reaches the controller without the token).
Bounded: ``MAX_EXAMPLES`` per operation and generation mode, and the test's timeout.
"""

from __future__ import annotations

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

from elastic_ep.scaling import ControlServer, ScalePhase
from elastic_ep.scaling.server import openapi_description
from tests.test_server import TOKEN, Controller

MAX_EXAMPLES = 150
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

schema = schemathesis.openapi.from_dict(openapi_description())
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    with_security_parameters=False,  # the test picks the token: right, none or wrong
)


class Tally:
    """What the run sent and got, for the summary printed at the end."""

    def __init__(self) -> None:
        self.cases = 0
        self.by_status: dict[int, int] = {}


@pytest.fixture(scope="module")
def live() -> Any:
    ctl = Controller()
    tally = Tally()
    with ControlServer(ctl, token=TOKEN) as srv:
        yield srv, ctl, tally
    print(f"\nfuzz: {tally.cases} cases, statuses {dict(sorted(tally.by_status.items()))}")


@schema.parametrize()
@schema.given(auth=st.sampled_from(["right", "right", "none", "wrong"]))
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_endpoint_against_its_description(case: Any, auth: str, live: Any) -> None:
    srv, ctl, tally = live
    headers = {"right": {"Authorization": f"Bearer {TOKEN}"}, "none": {}}.get(
        auth, {"Authorization": f"Bearer {TOKEN[::-1]}"}
    )
    before, submitted = ctl.state, ctl.submitted
    response = case.call_and_validate(base_url=srv.url, headers=headers, checks=CHECKS)
    tally.cases += 1
    tally.by_status[response.status_code] = tally.by_status.get(response.status_code, 0) + 1
    assert response.headers.get("content-type") == ["application/json"]
    assert isinstance(response.json(), dict)
    if response.status_code == 202:
        assert auth == "right" and case.method == "POST"
        ctl.state = replace(before, phase=ScalePhase.IDLE)  # ready for the next case
    else:
        assert ctl.state is before, f"{case.method} {case.path} -> {response.status_code}"
        if auth != "right" and case.method == "POST":
            assert ctl.submitted == submitted
