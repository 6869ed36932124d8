"""Control endpoint over HTTP (standard library only; the ``elastic_ep[server]`` extra).

- ``POST /scale`` with ``{"world_size": n, "mode": "drain"|"reject", "timeout_s": t}`` (or
  ``"members": [...]``): 202 and the status once the scale has started; 400 on bad input
  (malformed JSON, wrong types, a size the model cannot run at); 409 while a scale or a recovery
  runs.
- ``POST /rebalance`` with ``{"mode": "drain"|"reject", "timeout_s": t}`` (both optional; an
  empty body means the defaults): same members, a new placement for the engine's load; 202, 400
  or 409 as above.
- ``GET /status``: 200 and :meth:`ScaleStatus.to_json`.

Binds to 127.0.0.1 by default: the endpoint changes the job's resources and has no auth.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from elastic_ep.scaling.coordinator import ScaleConflict
from elastic_ep.scaling.request import RebalanceRequest, ScaleRequest
from elastic_ep.scaling.status import ScaleStatus

MAX_BODY_BYTES = 64 * 1024


class Controller(Protocol):
    """What the server drives (:class:`~elastic_ep.scaling.coordinator.ElasticCoordinator`)."""

    def submit(self, request: ScaleRequest | RebalanceRequest) -> ScaleStatus: ...

    def status(self) -> ScaleStatus: ...


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the coordinator's status is the log that matters; keep stderr quiet

    def _send(self, code: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/status":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})
            return
        self._send(HTTPStatus.OK, self.server.controller.status().to_json())

    def do_POST(self) -> None:
        parsers: dict[str, Callable[[Any], ScaleRequest | RebalanceRequest]] = {
            "/scale": ScaleRequest.from_json,
            "/rebalance": RebalanceRequest.from_json,
        }
        parse = parsers.get(self.path)
        if parse is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "Content-Length must be an integer"})
            return
        # a rebalance has no required field: an empty body means its defaults
        least = 0 if self.path == "/rebalance" else 1
        if not least <= length <= MAX_BODY_BYTES:
            self._send(
                HTTPStatus.BAD_REQUEST, {"error": f"body must be {least}..{MAX_BODY_BYTES} bytes"}
            )
            return
        try:
            body = json.loads(self.rfile.read(length)) if length else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {exc}"})
            return
        try:
            status = self.server.controller.submit(parse(body))
        except (ValueError, TypeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except ScaleConflict as exc:
            self._send(HTTPStatus.CONFLICT, {"error": str(exc)})
            return
        self._send(HTTPStatus.ACCEPTED, status.to_json())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], controller: Controller) -> None:
        super().__init__(address, _Handler)
        self.controller = controller


class ControlServer:
    """Serve ``/scale``, ``/rebalance`` and ``/status`` for ``controller`` on a background thread.

    Args:
        controller: the coordinator.
        host: interface to bind (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`url`).
    """

    def __init__(self, controller: Controller, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), controller)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="elastic-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (bounded)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
