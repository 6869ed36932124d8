"""Rendezvous: the job's one long-lived TCPStore, with a key prefix per (group, epoch).

Every process group of every epoch meets through the same TCPStore server. A group's keys live
under a prefix naming the group and its epoch (``group/<name>/epoch/<epoch>/...``), so the keys
of an old (or aborted) epoch can never be read by a new one, as long as epoch numbers are never
reused (:meth:`Rendezvous.next_epoch` hands out fresh ones). Creating a fresh TCPStore server per
generation sometimes stalls for seconds (see /work/shared/ANCHORS.md, torchft section); a
long-lived server plus a new prefix rebuilds gloo in milliseconds.

Each group talks to the store through its own client connection (:meth:`Rendezvous.client`):
the TCPStore client serialises its operations, so a group blocked in a rendezvous wait must not
hold up other users of :attr:`Rendezvous.store` (e.g. a coordinator polling for requests).
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta

from torch.distributed import PrefixStore, Store, TCPStore

_EPOCH_COUNTER_KEY = "elastic_ep/epoch_counter"
_MAX_IDLE_CLIENTS = 16

MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""The longest timeout accepted (a week): torch keeps timeouts as integer milliseconds, and an
infinite one would never let a failure surface."""


def check_timeout(timeout_s: float, name: str = "timeout_s") -> None:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(timeout_s).__name__}")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ValueError(f"{name} must be > 0 and at most {MAX_TIMEOUT_S:g} s, got {timeout_s}")


def prefix_of(*parts: str | int) -> str:
    """Join key-prefix parts with ``/``; each part must be a non-empty str without ``/`` or an int >= 0.

    Rejecting ``/`` inside a part keeps prefixes unambiguous (``("a/b", "c")`` would otherwise
    collide with ``("a", "b/c")``).
    """
    if not parts:
        raise ValueError("a key prefix needs at least one part")
    out: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, bool) or not isinstance(part, str | int):
            raise TypeError(f"prefix part {i} must be a str or int, got {type(part).__name__}")
        if isinstance(part, int):
            if part < 0:
                raise ValueError(f"prefix part {i} must be >= 0, got {part}")
            out.append(str(part))
            continue
        if not part or "/" in part:
            raise ValueError(
                f"prefix part {i} must be a non-empty string without '/', got {part!r}"
            )
        out.append(part)
    return "/".join(out)


def _listen_on(host: str, port: int) -> int:
    """A listening socket bound to ``host`` only, its fd handed to the TCPStore server (which
    then owns and closes it): on its own the server listens on every interface of the machine."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    server = socket.create_server(address[:2], family=family, backlog=1024)
    return server.detach()


class Rendezvous:
    """One long-lived TCPStore per job; every group's keys live under a prefix naming the group and
    its epoch, so no key of an old epoch can be read by a new one.

    Args:
        host: address of the TCPStore server (the master's address); the master's server
            listens on this address only (e.g. the cluster's private interface).
        port: its TCP port; ``0`` on the master binds a free one (read it from :attr:`port`:
            picking a free port first and binding it later races with other sockets).
        is_master: True in exactly one process of the job: that process runs the server (and
            must outlive every other user of the store).
        timeout_s: timeout of the shared :attr:`store` client for connecting and for its waits.
    """

    def __init__(self, host: str, port: int, *, is_master: bool, timeout_s: float = 60.0) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, got {type(port).__name__}")
        if not (0 if is_master else 1) <= port < 65536:
            raise ValueError(
                f"port must be in 1..65535 (0 on the master: any free port), got {port}"
            )
        check_timeout(timeout_s)
        self.host = host
        self.is_master = bool(is_master)
        self.timeout_s = float(timeout_s)
        self._idle: list[Store] = []
        self._idle_lock = threading.Lock()
        listen_fd = _listen_on(host, port) if self.is_master else None
        self._store: TCPStore | None = TCPStore(
            host,
            port,
            is_master=self.is_master,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=listen_fd,
        )
        self.port = self._store.port  # the bound one: ``port`` may be 0 on the master

    @classmethod
    def from_env(cls, *, timeout_s: float = 60.0) -> Rendezvous:
        """Rendezvous from the torchrun-style environment.

        ``MASTER_ADDR`` (default ``127.0.0.1``) and ``MASTER_PORT`` (required) name the server.
        The process whose ``RANK`` is ``0`` runs it; if ``RANK`` is unset, ``GROUP_RANK`` (the node
        rank under torchrun) decides instead. Set ``ELASTIC_EP_STORE_MASTER=1``/``0`` to decide
        explicitly (e.g. for a joiner started long after rank 0).
        """
        port_s = os.environ.get("MASTER_PORT")
        if port_s is None:
            raise ValueError("MASTER_PORT is not set")
        try:
            port = int(port_s)
        except ValueError:
            raise ValueError(f"MASTER_PORT must be an integer, got {port_s!r}") from None
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        explicit = os.environ.get("ELASTIC_EP_STORE_MASTER")
        if explicit is not None:
            if explicit not in ("0", "1"):
                raise ValueError(f"ELASTIC_EP_STORE_MASTER must be 0 or 1, got {explicit!r}")
            is_master = explicit == "1"
        else:
            rank = os.environ.get("RANK", os.environ.get("GROUP_RANK"))
            if rank is None:
                raise ValueError(
                    "neither RANK nor GROUP_RANK is set: cannot tell who runs the store"
                )
            is_master = rank.strip() == "0"
        return cls(host, port, is_master=is_master, timeout_s=timeout_s)

    @property
    def store(self) -> TCPStore:
        """The raw shared TCPStore client (the server too, in the master process)."""
        if self._store is None:
            raise ValueError("this Rendezvous is closed")
        return self._store

    def scoped(self, *parts: str | int) -> PrefixStore:
        """A view of the shared store under the prefix ``parts`` (e.g. ``scoped("world", "epoch", 3)``)."""
        return PrefixStore(prefix_of(*parts), self.store)

    def client(self, timeout_s: float) -> Store:
        """A client connection to the same server for one user at a time, with its own timeout.

        A group rendezvous waits on keys for up to its timeout; on a private client that wait
        blocks nobody else, and the timeout does not change the shared client's. Connections
        handed back with :meth:`recycle` are reused (a new one costs a TCP handshake, a large
        part of a gloo rebuild).
        """
        check_timeout(timeout_s)
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.store.clone()  # type: ignore[attr-defined]  # missing from torch's stubs
        conn.set_timeout(timedelta(seconds=timeout_s))
        return conn

    def recycle(self, conn: Store) -> None:
        """Hand back a connection from :meth:`client` that is idle and in a clean state."""
        with self._idle_lock:
            if self._store is not None and len(self._idle) < _MAX_IDLE_CLIENTS:
                self._idle.append(conn)

    def next_epoch(self, name: str) -> int:
        """A fresh epoch number for ``name``: strictly greater than every number returned before
        (by any process of this job) for that name. Atomic on the server, so epochs are never
        reused even when an attempt fails. The caller (a coordinator) tells the members."""
        return int(self.store.add(f"{_EPOCH_COUNTER_KEY}/{prefix_of(name)}", 1))

    def close(self) -> None:
        """Drop this process's connection (and the server, in the master). Idempotent.

        Groups built on this rendezvous hold their own client connections and keep working
        until the master closes.
        """
        with self._idle_lock:
            self._idle.clear()
            self._store = None
