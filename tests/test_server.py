"""HTTP control endpoint, with real HTTP requests over loopback.

The controller here is a small in-process one (the full coordinator behind the same server is
exercised in tests/test_scaling_e2e.py); it applies the same validation and one-at-a-time rule.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from elastic_ep.scaling import (
    ControlServer,
    ScaleConflict,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)


class _Controller:
    def __init__(self) -> None:
        self.limits = ScaleLimits(8, 4, 16)
        self.state = ScaleStatus(ScalePhase.IDLE, 1, (0, 1))
        self.lock = threading.Lock()

    def submit(self, request: ScaleRequest) -> ScaleStatus:
        with self.lock:
            if self.state.phase.is_active:
                raise ScaleConflict("a scale is running")
            request.check(self.limits)
            members = request.next_members(self.state.members, range(100, 200))
            self.state = replace(self.state, phase=ScalePhase.PREPARING, members=members)
            return self.state

    def status(self) -> ScaleStatus:
        return self.state


def _call(
    url: str, method: str = "GET", body: Any = None, raw: bytes | None = None
) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture()
def server() -> Any:
    ctl = _Controller()
    with ControlServer(ctl) as srv:
        yield srv, ctl


def test_status_and_scale(server: Any) -> None:
    srv, _ = server
    assert srv.url.startswith("http://127.0.0.1:")
    code, body = _call(srv.url + "/status")
    assert code == 200 and body["phase"] == "idle" and body["world_size"] == 2
    code, body = _call(
        srv.url + "/scale", "POST", {"world_size": 3, "mode": "reject", "timeout_s": 5}
    )
    assert code == 202 and body["phase"] == "preparing" and body["members"] == [0, 1, 100]
    code, body = _call(srv.url + "/scale", "POST", {"world_size": 4})
    assert code == 409 and "running" in body["error"]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"world_size": 0}, "world_size must be >= 1"),
        ({"world_size": 5}, "max-physical-expert capacity"),
        ({"world_size": 2.5}, "must be an int"),
        ({"world_size": "3"}, "must be an int"),
        ({"world_size": 3, "mode": "later"}, "mode must be"),
        ({"world_size": 2}, "already has 2 ranks"),
    ],
)
def test_bad_requests_are_400_without_state_change(server: Any, payload: dict, match: str) -> None:
    srv, ctl = server
    before = ctl.state
    code, body = _call(srv.url + "/scale", "POST", payload)
    assert code == 400 and match in body["error"]
    assert ctl.state is before


def test_malformed_and_unknown(server: Any) -> None:
    srv, _ = server
    assert _call(srv.url + "/scale", "POST", raw=b"{not json")[0] == 400
    assert _call(srv.url + "/nope")[0] == 404
    assert _call(srv.url + "/scale", "POST", raw=b"")[0] == 400
