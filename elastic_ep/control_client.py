"""``elastic-ep scale N`` / ``rebalance`` / ``status``: talk to a running control endpoint.

Each command sends one request to the endpoint (``--url``, else ``$ELASTIC_EP_URL``, else the
launcher's default ``http://127.0.0.1:8470``) with the bearer token (``--token``, else
``$ELASTIC_EP_TOKEN``). ``scale`` and ``rebalance`` then poll ``GET /status`` and print each
phase as the event reaches it, and the outcome; the exit status is 0 when it completed, 1 when
it rolled back or failed, 2 when the request was refused or the endpoint could not be reached
(one line on stderr, no traceback).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastic_ep.launch import DEFAULT_HTTP
from elastic_ep.scaling.server import TOKEN_ENV

URL_ENV = "ELASTIC_EP_URL"
POLL_S = 0.2
FINAL_PHASES = ("completed", "rolled_back", "failed")


class EndpointError(ValueError):
    """The endpoint refused a request or could not be reached (the message says which)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the control endpoint is and the token to send.

    Attributes:
        url: ``http://host:port`` (no trailing slash).
        token: the bearer token, or ``None``.
        timeout_s: bound on every single HTTP request.
    """

    url: str
    token: str | None = None
    timeout_s: float = 10.0

    @classmethod
    def from_args(cls, url: str | None, token: str | None) -> Endpoint:
        url = url or os.environ.get(URL_ENV) or f"http://{DEFAULT_HTTP}"
        if not url.startswith("http://"):
            raise ValueError(f"--url {url!r}: expected http://HOST:PORT")
        return cls(url.rstrip("/"), token or os.environ.get(TOKEN_ENV) or None)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request; the JSON answer, or :class:`EndpointError` with the server's reason."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as err:
            raise EndpointError(_refusal(err)) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise EndpointError(
                f"cannot reach {self.url}: {reason} (is `elastic-ep launch` running there?)"
            ) from None
        except json.JSONDecodeError:
            raise EndpointError(f"{self.url}{path} did not answer JSON") from None


def _refusal(err: urllib.error.HTTPError) -> str:
    try:
        reason = json.loads(err.read()).get("error", "")
    except (ValueError, AttributeError):
        reason = ""
    hint = {
        401: " (pass --token or set $ELASTIC_EP_TOKEN)",
        403: " (the token does not match the launcher's)",
    }.get(err.code, "")
    return f"HTTP {err.code}: {reason or err.reason}{hint}"


def describe(status: dict[str, Any]) -> str:
    """A one-line summary of a ``GET /status`` answer."""
    words = [
        f"phase {status['phase']}",
        f"world {status['world_size']}",
        f"members {status['members']}",
        f"epoch {status['epoch']}",
    ]
    if status.get("event"):
        words.append(f"last event {status['event']} #{status['event_id']}")
    if status.get("blocking_s") is not None:
        words.append(f"blocking {1e3 * status['blocking_s']:.1f} ms")
    if status.get("kv_budget_bytes") is not None:
        words.append(f"kv budget {status['kv_budget_bytes']} B")
    if status.get("balance_after") is not None:
        words.append(f"balance {status['balance_before']:.3f} -> {status['balance_after']:.3f}")
    if status.get("experts_moved") is not None:
        words.append(f"experts moved {status['experts_moved']}")
    if status.get("error"):
        words.append(f"error: {status['error']}")
    return ", ".join(words)


def follow(
    endpoint: Endpoint,
    started: dict[str, Any],
    deadline_s: float,
    out: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Poll ``/status`` until the event that ``started`` (a 202 answer) describes ends, printing
    each phase it enters. Returns the last status; :class:`EndpointError` past ``deadline_s``.

    A rank that dies during the event ends it too: the status then reports a ``recovery``.
    """
    start = time.monotonic()
    seen = None
    while True:
        status = endpoint.call("GET", "/status")
        mine = status.get("event_id") == started["event_id"]
        if mine and status["phase"] != seen:
            seen = status["phase"]
            out(f"  {time.monotonic() - start:6.2f} s  {seen}")
        if not mine or status.get("event") != started.get("event"):
            return status
        if status["phase"] in FINAL_PHASES:
            return status
        if time.monotonic() - start > deadline_s:
            raise EndpointError(f"event #{started['event_id']} did not end within {deadline_s:g} s")
        time.sleep(POLL_S)


def run_event(
    endpoint: Endpoint,
    path: str,
    body: dict[str, Any],
    *,
    wait: bool,
    out: Callable[[str], None] = print,
) -> int:
    """POST a scale or rebalance, then (``wait``) follow it; the exit status."""
    started = endpoint.call("POST", path, body)
    out(f"{started['event']} #{started['event_id']} started: members {started['members']}")
    if not wait:
        return 0
    deadline = float(body.get("timeout_s", 60.0)) + 60.0
    final = follow(endpoint, started, deadline, out)
    out(describe(final))
    same = final["event_id"] == started["event_id"] and final["event"] == started["event"]
    return 0 if same and final["phase"] == "completed" else 1
