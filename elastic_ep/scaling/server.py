"""Control endpoint over HTTP (standard library only; the ``elastic_ep[server]`` extra).

- ``POST /scale`` with ``{"world_size": n, "mode": "drain"|"reject", "timeout_s": t}`` (or
  ``"members": [...]``): 202 and the status once the scale has started; 400 on bad input
  (malformed JSON, wrong types, a size the model cannot run at); 409 while a scale or a recovery
  runs.
- ``POST /rebalance`` with ``{"mode": "drain"|"reject", "timeout_s": t}`` (both optional; ``{}``
  or an empty body means the defaults): same members, a new placement for the engine's load; 202,
  400 or 409 as above.
- ``GET /status``: 200 and :meth:`ScaleStatus.to_json`.
- ``GET /openapi.json``: the OpenAPI description of all of this (``openapi.json`` beside this
  module).

Security (docs/security.md): with a token, every ``POST`` needs ``Authorization: Bearer <token>``
(401 without one, 403 with a wrong one, compared in constant time; nothing changes either way).
The token comes from the ``token`` argument or the ``ELASTIC_EP_TOKEN`` environment variable.
Binding an address other than loopback without a token raises ``ValueError`` unless
``allow_insecure=True``; there ``GET /status`` needs the token too. Every connection has a
deadline for the whole request (a client that sends half a request and stalls is cut off), the
body is capped (413 above it), and at most ``max_connections`` are served at once (503 beyond;
the accept loop answers those itself after a wait of at most 0.2 s, so a flood cannot spawn
threads). Every response, errors included, is JSON.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

from elastic_ep.scaling.coordinator import ScaleConflict
from elastic_ep.scaling.request import RebalanceRequest, ScaleRequest
from elastic_ep.scaling.status import ScaleStatus

MAX_BODY_BYTES = 64 * 1024
TOKEN_ENV = "ELASTIC_EP_TOKEN"
_NO_BODY = object()  # no usable body: the answer is sent already (``None`` is JSON's null)
MIN_TOKEN_CHARS = 16
_SLOT_WAIT_S = 0.2  # how long a connection beyond the bound waits for a slot before its 503


class Controller(Protocol):
    """What the server drives (:class:`~elastic_ep.scaling.coordinator.ElasticCoordinator`)."""

    def submit(self, request: ScaleRequest | RebalanceRequest) -> ScaleStatus: ...

    def status(self) -> ScaleStatus: ...


def openapi_description() -> dict[str, Any]:
    """The endpoint's OpenAPI 3.0 description (the ``openapi.json`` shipped with this module)."""
    text = resources.files("elastic_ep.scaling").joinpath("openapi.json").read_text()
    return dict(json.loads(text))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) resolves only to loopback addresses (``""``, every
    interface, does not)."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve host {host!r}: {err}") from None
    addrs = {str(info[4][0]).split("%")[0] for info in infos}  # "%": an IPv6 scope id
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def resolve_token(token: str | None) -> str | None:
    """``token``, else ``$ELASTIC_EP_TOKEN``, else ``None``; a weak token is a ``ValueError``."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    if token is None:
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise ValueError(
            f"the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if any(c.isspace() for c in token):
        raise ValueError("the token must not contain whitespace")
    return token


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _raw_response(code: HTTPStatus, body: dict[str, Any]) -> bytes:
    """A whole HTTP/1.0 response, for the accept loop's own refusals."""
    data = _json_bytes(body)
    head = (
        f"HTTP/1.0 {code.value} {code.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    error_content_type = "application/json"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout_s)  # bounds every read and write
        self._expired = threading.Event()
        # ...and this bounds the whole request: a client trickling bytes is cut off too
        self._deadline = threading.Timer(self.server.read_timeout_s, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def _expire(self) -> None:
        self._expired.set()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the coordinator's status is the log that matters; keep stderr quiet

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, headers too long...) as JSON."""
        status = HTTPStatus(code)
        self._send(status, {"error": message or status.phrase})

    def _send(
        self, code: HTTPStatus, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        if self._expired.is_set():
            return
        data = _json_bytes(body)
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            pass  # the client went away; nothing was changed by sending
        self.close_connection = True

    def _authorized(self, needed: bool) -> bool:
        """Check the bearer token (when one is needed); answer 401/403 and return False if bad."""
        token = self.server.token
        if not needed or token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            self._send(
                HTTPStatus.UNAUTHORIZED,
                {"error": "this endpoint needs 'Authorization: Bearer <token>'"},
                {"WWW-Authenticate": 'Bearer realm="elastic_ep"'},
            )
            return False
        if not hmac.compare_digest(
            value.strip().encode("latin-1", "replace"), token.encode("latin-1")
        ):
            self._send(HTTPStatus.FORBIDDEN, {"error": "wrong token"})
            return False
        return True

    def _path(self) -> str:
        return urlsplit(self.path).path

    def do_GET(self) -> None:
        path = self._path()
        if path == "/openapi.json":
            self._send(HTTPStatus.OK, self.server.openapi)
        elif path == "/status":
            if self._authorized(not self.server.loopback):
                self._send(HTTPStatus.OK, self.server.controller.status().to_json())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {path}"})

    def _read_body(self, empty_ok: bool) -> Any:
        """The request's JSON body (any JSON value, ``null`` too), or ``_NO_BODY`` after answering
        the error (400/411/413) or when the connection was cut."""
        if "Transfer-Encoding" in self.headers:
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "send a Content-Length, not chunks"})
            return _NO_BODY
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length is required"})
            return _NO_BODY
        if not raw_length.strip().isdigit():
            self._send(HTTPStatus.BAD_REQUEST, {"error": "Content-Length must be an integer"})
            return _NO_BODY
        length = int(raw_length)
        if length > self.server.max_body_bytes:
            self._send(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body must be at most {self.server.max_body_bytes} bytes"},
            )
            return _NO_BODY
        try:
            data = self.rfile.read(length) if length else b""
        except OSError:  # the read deadline passed or the client reset: nothing is done
            self.close_connection = True
            return _NO_BODY
        if len(data) < length:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is shorter than its length"})
            return _NO_BODY
        if not data and empty_ok:
            return {}
        if not data.strip():  # whitespace is no JSON: only a body of length 0 means the defaults
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
            return _NO_BODY
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and over-long ints too
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"body is not valid JSON: {exc}"})
            return _NO_BODY

    def do_POST(self) -> None:
        parsers: dict[str, Callable[[Any], ScaleRequest | RebalanceRequest]] = {
            "/scale": ScaleRequest.from_json,
            "/rebalance": RebalanceRequest.from_json,
        }
        path = self._path()
        parse = parsers.get(path)
        if parse is None:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {path}"})
            return
        if not self._authorized(True):
            return
        body = self._read_body(empty_ok=path == "/rebalance")
        if body is _NO_BODY or self._expired.is_set():
            return  # answered, or cut off: a request that did not arrive whole changes nothing
        try:
            status = self.server.controller.submit(parse(body))
        except (ValueError, TypeError) as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        except ScaleConflict as exc:
            self._send(HTTPStatus.CONFLICT, {"error": str(exc)})
            return
        self._send(HTTPStatus.ACCEPTED, status.to_json())

    def _not_allowed(self) -> None:
        allow = {"/status": "GET", "/openapi.json": "GET", "/scale": "POST", "/rebalance": "POST"}
        path = self._path()
        if path not in allow:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {self.command} {path}"})
            return
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            {"error": f"{path} takes {allow[path]} only"},
            {"Allow": allow[path]},
        )

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        controller: Controller,
        *,
        token: str | None,
        loopback: bool,
        max_body_bytes: int,
        read_timeout_s: float,
        max_connections: int,
    ) -> None:
        super().__init__(address, _Handler)
        self.controller = controller
        self.token = token
        self.loopback = loopback
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.openapi = openapi_description()
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        # a short wait, not none: a client's next request can arrive before the thread that
        # answered its previous one has given the slot back
        if not self._slots.acquire(timeout=_SLOT_WAIT_S):
            # answered here, on the accept thread, with a short send timeout: no thread spawned
            with contextlib.suppress(OSError):
                request.settimeout(0.5)
                request.sendall(
                    _raw_response(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        {"error": "too many connections; retry shortly"},
                    )
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that vanished mid-request is not the server's error; anything else is logged
        (the connection closes without an answer, and nothing has changed)."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            traceback.print_exc()


class ControlServer:
    """Serve ``/scale``, ``/rebalance``, ``/status`` and ``/openapi.json`` on a background thread.

    Args:
        controller: the coordinator.
        host: interface to bind (loopback by default).
        port: TCP port; 0 picks a free one (see :attr:`url`).
        token: the bearer token every ``POST`` must carry (at least 16 printable ASCII
            characters); ``None`` reads ``$ELASTIC_EP_TOKEN``; neither: no auth (loopback only).
        allow_insecure: bind a non-loopback ``host`` without a token (anyone who reaches the
            port can then scale the job).
        max_body_bytes: largest request body accepted (413 above).
        read_timeout_s: deadline for a connection's whole request and response.
        max_connections: connections served at once (503 beyond).

    Raises:
        ValueError: a non-loopback ``host`` without a token and without ``allow_insecure``, a
            weak token, a limit below 1.
    """

    def __init__(
        self,
        controller: Controller,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        allow_insecure: bool = False,
        max_body_bytes: int = MAX_BODY_BYTES,
        read_timeout_s: float = 10.0,
        max_connections: int = 16,
    ) -> None:
        token = resolve_token(token)
        loopback = is_loopback(host)
        if not loopback and token is None and not allow_insecure:
            raise ValueError(
                f"refusing to bind {host!r} (not loopback) without a token: anyone who reaches "
                f"the port could scale the job; pass a token (or set ${TOKEN_ENV}), or "
                "allow_insecure=True (--insecure) to do it anyway"
            )
        if max_body_bytes < 1 or max_connections < 1 or not read_timeout_s > 0:
            raise ValueError("max_body_bytes, max_connections and read_timeout_s must be > 0")
        self._server = _Server(
            (host, port),
            controller,
            token=token,
            loopback=loopback,
            max_body_bytes=max_body_bytes,
            read_timeout_s=read_timeout_s,
            max_connections=max_connections,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="elastic-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def has_token(self) -> bool:
        return self._server.token is not None

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (bounded; also for a server never started)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
