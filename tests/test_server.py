"""HTTP control endpoint, with real HTTP requests (and raw sockets) over loopback.

The controller here is a small in-process one (the full coordinator behind the same server is
exercised in tests/test_scaling_e2e.py and tests/test_launch_cli.py); it applies the same
validation and one-at-a-time rule, and counts what reached it.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Any

import pytest

from elastic_ep.scaling import (
    ControlServer,
    RebalanceRequest,
    ScaleConflict,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
)
from elastic_ep.scaling.server import openapi_description

TOKEN = "t0ken-for-the-tests-0123456789"


class Controller:
    """Validates like the coordinator; ``submitted`` counts the requests that reached it."""

    def __init__(self) -> None:
        self.limits = ScaleLimits(8, 4, 16)
        self.state = ScaleStatus(ScalePhase.IDLE, 1, (0, 1))
        self.lock = threading.Lock()
        self.submitted = 0

    def submit(self, request: ScaleRequest | RebalanceRequest) -> ScaleStatus:
        with self.lock:
            self.submitted += 1
            if self.state.phase.is_active:
                raise ScaleConflict("a scale is running")
            members = self.state.members
            if isinstance(request, ScaleRequest):
                request.check(self.limits)
                members = request.next_members(members, range(100, 200))
            self.state = replace(self.state, phase=ScalePhase.PREPARING, members=members)
            return self.state

    def status(self) -> ScaleStatus:
        return self.state


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = None,
) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_exchange(url: str, request: bytes, *, wait_s: float = 10.0) -> bytes:
    """Send ``request`` as is and read until the server closes (bounded by ``wait_s``)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def status_line(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    ctl = Controller()
    with ControlServer(ctl) as srv:
        yield srv, ctl


@pytest.fixture()
def secured(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A token, two connections at most, and a deadline no test request comes near."""
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    ctl = Controller()
    with ControlServer(ctl, token=TOKEN, read_timeout_s=60.0, max_connections=2) as srv:
        yield srv, ctl


@pytest.fixture()
def impatient(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A token and a 1 s deadline per request (the stalling clients' tests)."""
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    ctl = Controller()
    with ControlServer(ctl, token=TOKEN, read_timeout_s=1.0) as srv:
        yield srv, ctl


def test_status_and_scale(server: Any) -> None:
    srv, _ = server
    assert srv.url.startswith("http://127.0.0.1:")
    code, body = call(srv.url + "/status")
    assert code == 200 and body["phase"] == "idle" and body["world_size"] == 2
    code, body = call(
        srv.url + "/scale", "POST", {"world_size": 3, "mode": "reject", "timeout_s": 5}
    )
    assert code == 202 and body["phase"] == "preparing" and body["members"] == [0, 1, 100]
    code, body = call(srv.url + "/scale", "POST", {"world_size": 4})
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
    code, body = call(srv.url + "/scale", "POST", payload)
    assert code == 400 and match in body["error"]
    assert ctl.state is before


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "must be a JSON object"),
        (b"[" * 50_000 + b"]" * 10_000, "not valid JSON"),  # nested past the recursion limit
        (b'{"world_size": ' + b"9" * 5000 + b"}", "not valid JSON"),  # int past the digit cap
        (b"[3]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_malformed_bodies_are_400(server: Any, raw: bytes, match: str) -> None:
    srv, ctl = server
    code, body = call(srv.url + "/scale", "POST", raw=raw)
    assert code == 400 and match in body["error"]
    assert ctl.state.phase is ScalePhase.IDLE


def test_unknown_paths_and_methods_answer_json(server: Any) -> None:
    srv, _ = server
    assert call(srv.url + "/nope")[0] == 404
    assert call(srv.url + "/nope", "POST", {})[0] == 404
    code, body = call(srv.url + "/scale", "PUT", {"world_size": 3})
    assert code == 405 and "POST" in body["error"]
    assert call(srv.url + "/status", "DELETE")[0] == 405
    assert call(srv.url + "/status?verbose=1")[0] == 200


def test_openapi_is_served_and_matches_the_file(server: Any) -> None:
    srv, _ = server
    code, body = call(srv.url + "/openapi.json")
    assert code == 200 and body == openapi_description()
    assert set(body["paths"]) == {"/status", "/openapi.json", "/scale", "/rebalance"}


def test_rebalance_takes_an_empty_body_but_not_whitespace(server: Any) -> None:
    srv, ctl = server
    code, body = call(srv.url + "/rebalance", "POST", raw=b"\n")  # the fuzz run found it taken
    assert code == 400 and "JSON object" in body["error"] and ctl.submitted == 0
    code, body = call(srv.url + "/rebalance", "POST", raw=b"")
    assert code == 202 and body["members"] == [0, 1] and ctl.submitted == 1


# ---- auth ---------------------------------------------------------------------------------


def test_post_without_token_is_401_and_wrong_token_403(secured: Any) -> None:
    srv, ctl = secured
    for path, payload in (("/scale", {"world_size": 3}), ("/rebalance", {})):
        code, body = call(srv.url + path, "POST", payload)
        assert code == 401 and "Bearer" in body["error"]
        code, body = call(srv.url + path, "POST", payload, token=TOKEN + "x")
        assert code == 403 and body["error"] == "wrong token"
        code, _ = call(srv.url + path, "POST", payload, token=TOKEN[:-1])
        assert code == 403
    assert ctl.submitted == 0 and ctl.state.phase is ScalePhase.IDLE
    assert call(srv.url + "/status")[0] == 200  # open on loopback
    code, body = call(srv.url + "/scale", "POST", {"world_size": 3}, token=TOKEN)
    assert code == 202 and body["members"] == [0, 1, 100]


def test_basic_auth_or_bare_token_is_401(secured: Any) -> None:
    srv, ctl = secured
    for header in (f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer "):
        request = (
            f"POST /scale HTTP/1.1\r\nHost: x\r\nAuthorization: {header}\r\n"
            "Content-Length: 16\r\n\r\n"
        ).encode() + b'{"world_size":3}'
        assert status_line(raw_exchange(srv.url, request))[0] == 401
    assert ctl.submitted == 0


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTIC_EP_TOKEN", TOKEN)
    ctl = Controller()
    with ControlServer(ctl) as srv:
        assert srv.has_token
        assert call(srv.url + "/rebalance", "POST", {})[0] == 401
        assert call(srv.url + "/rebalance", "POST", {}, token=TOKEN)[0] == 202


@pytest.mark.parametrize("token", ["short", "x" * 15, "with space " * 3, "é" * 20])
def test_weak_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValueError, match="token must"):
        ControlServer(Controller(), token=token)


def test_non_loopback_bind_needs_a_token_or_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    for host in ("0.0.0.0", ""):  # "" binds every interface too
        with pytest.raises(ValueError, match="not loopback"):
            ControlServer(Controller(), host=host)
    with pytest.raises(ValueError, match="cannot resolve host"):
        ControlServer(Controller(), host="no-such-host.invalid")
    ControlServer(Controller(), host="0.0.0.0", allow_insecure=True).stop()
    with ControlServer(Controller(), host="0.0.0.0", token=TOKEN) as srv:
        port = srv.url.rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        assert call(url + "/status")[0] == 401  # off loopback the status needs the token too
        assert call(url + "/status", token=TOKEN)[0] == 200
        assert call(url + "/openapi.json")[0] == 200


# ---- request limits (raw sockets) ---------------------------------------------------------


def test_body_over_the_cap_is_413(secured: Any) -> None:
    srv, ctl = secured
    request = (
        f"POST /scale HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Length: 10000000\r\n\r\n{"
    ).encode()
    code, body = status_line(raw_exchange(srv.url, request))
    assert code == 413 and "at most 65536 bytes" in body["error"]
    assert ctl.submitted == 0


@pytest.mark.parametrize(
    "headers", ["", "Transfer-Encoding: chunked\r\n", "Content-Length: -5\r\n"]
)
def test_missing_or_bad_length(secured: Any, headers: str) -> None:
    srv, ctl = secured
    request = (
        f"POST /rebalance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n{headers}\r\n"
    ).encode()
    code, _ = status_line(raw_exchange(srv.url, request))
    assert code in (400, 411)
    assert ctl.submitted == 0


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /rebal",  # stalls in the request line
        # in the headers (no blank line): cut off there, it would read as a whole rebalance
        f"POST /rebalance HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0".encode(),
        f"POST /scale HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 30\r\n\r\n"
        '{"world_'.encode(),  # in the body
    ],
)
def test_half_a_request_is_cut_off_and_changes_nothing(impatient: Any, partial: bytes) -> None:
    srv, ctl = impatient
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(partial)
        assert sock.recv(65536) == b""  # the server closed it (read_timeout_s=1), no answer
    assert ctl.submitted == 0 and ctl.state.phase is ScalePhase.IDLE
    assert call(srv.url + "/status")[0] == 200


def test_a_trickling_client_is_cut_off(impatient: Any) -> None:
    """Header bytes one at a time, each well within the per-read timeout: the request's deadline
    ends it, and the headers cut short there (a whole rebalance, were they taken as ended)
    change nothing."""
    srv, ctl = impatient
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    head = f"POST /rebalance HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\n"
    closed = False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        for byte in b"X-Pad: y\r\n" * 1000:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.05)
                closed = sock.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            break
    assert closed, "the server kept a trickling request open past its deadline"
    assert ctl.submitted == 0


def test_back_to_back_requests_fit_one_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's next request can arrive before the thread that answered its previous one has
    given the slot back; with one slot, every one of these sequential requests still gets 200."""
    monkeypatch.delenv("ELASTIC_EP_TOKEN", raising=False)
    with ControlServer(Controller(), max_connections=1) as srv:
        codes = [call(srv.url + "/status")[0] for _ in range(300)]
    assert codes == [200] * 300


def test_connections_beyond_the_bound_get_503(secured: Any) -> None:
    srv, ctl = secured
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
    try:
        for sock in held:  # each holds a slot with half a request
            sock.sendall(b"GET /sta")
        code, body = status_line(raw_exchange(srv.url, b"GET /status HTTP/1.0\r\n\r\n"))
        assert code == 503 and "too many connections" in body["error"]
    finally:
        for sock in held:
            sock.close()
    for _ in range(200):  # the slots come back once the held connections end (bounded)
        code, _ = status_line(raw_exchange(srv.url, b"GET /status HTTP/1.0\r\n\r\n"))
        if code == 200:
            break
        threading.Event().wait(0.05)
    assert code == 200
    assert ctl.submitted == 0
