"""Test hosts on one Linux machine: network namespaces on a private bridge, with faults.

:class:`TestNetwork` makes ``n`` hosts. Each host is a network namespace with one interface
``eth0`` and one address in a private subnet (``10.213.0.<i+1>/24``); the namespaces are the only
place that subnet exists, so parallel networks never collide and nothing outside them changes. The
hosts' veth pairs end on a bridge inside a namespace of its own (the "switch")::

    host i: eth0 (10.213.0.<i+1>) ==veth== v<i> --[relay]-- br0 (switch namespace)

A process runs on a host through ``ip netns exec`` (:meth:`Host.popen`); its environment gets
``GLOO_SOCKET_IFNAME=eth0`` so gloo binds the host's address. Faults:

- :meth:`TestNetwork.partition` / :meth:`TestNetwork.heal`: the host's switch port goes down (the
  carrier drops; sockets stay open and TCP retransmits into the void, as with a pulled cable)
  and comes back up.
- per-host ``delay_ms`` and ``loss`` (:meth:`TestNetwork.impair`): like ``tc netem`` on the host's
  interface (every frame the host sends waits ``delay_ms`` and is dropped with probability
  ``loss``; frames to the host pass untouched), for kernels without the netem qdisc. A relay
  process in the switch namespace carries the host's frames between ``v<i>`` and the bridge
  over two packet sockets; the host's interface has segmentation offload off so every frame
  fits the link's MTU. Between two hosts with delays ``a`` and ``b`` the round trip grows by
  ``a + b``.

Every name carries a unique tag, and :meth:`TestNetwork.close` (also on leaving the ``with``
block) kills every process still inside the namespaces and deletes them. Needs root and
iproute2: :func:`unavailable_reason` says why not, for a test to skip.

Example (root only)::

    with TestNetwork(3, delay_ms=[0.0, 0.2, 0.2]) as net:
        server = net.hosts[0].popen(["python3", "-m", "http.server", "8000"])
        out = net.hosts[1].run(["python3", "-c", "print(1)"])
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SUBNET = "10.213.0"
"""The first three octets of every test network's /24 (it exists only inside the namespaces)."""

_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_RELAY_QUEUE = 10_000  # frames waiting in one relay direction; more are dropped (netem's limit)
_RELAY_LIFETIME_S = 3600.0  # a relay left behind by a killed test ends on its own
_counter = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why test hosts cannot be made here (not root, no iproute2, no netns), or ``None``."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"eeprobe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One test host: a network namespace with ``eth0`` at :attr:`address`."""

    index: int
    netns: str
    address: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this host (``ip netns exec <netns> ...``)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment for a process on the host: gloo binds ``eth0``."""
        out = dict(os.environ)
        out["GLOO_SOCKET_IFNAME"] = "eth0"
        out.update(extra or {})
        return out

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host (``env`` is added to :meth:`env`); killed at close.

        ``ip netns exec`` execs ``argv`` in place, so the Popen's pid is the process's own (a
        signal sent to it, e.g. SIGSTOP, reaches the program).
        """
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(argv), env=self.env(env), **kwargs
        )
        self._procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout_s: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion (bounded); return its output."""
        return subprocess.run(
            self.command(argv),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


class TestNetwork:
    """``n`` test hosts on a private bridge (see the module docstring); a context manager.

    Args:
        n: number of hosts (1..250).
        delay_ms: one number for every host, or one per host: milliseconds added to every frame
            the host sends (0 = none).
        loss: the same shape: probability (0..1) that a frame the host sends is dropped.
        seed: seeds the relays' loss draws.

    Attributes:
        hosts: the :class:`Host` s, ``hosts[i].address == f"10.213.0.{i + 1}"``.
        tag: the unique part of every namespace name.
        switch: the switch's namespace (host ``i``'s port there is ``v<i>``).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        n: int,
        *,
        delay_ms: float | Sequence[float] = 0.0,
        loss: float | Sequence[float] = 0.0,
        seed: int = 0,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if not 1 <= n <= 250:
            raise ValueError(f"n must be in 1..250, got {n}")
        delays = _per_host("delay_ms", delay_ms, n, upper=60_000.0)
        losses = _per_host("loss", loss, n, upper=1.0)
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"cannot make test hosts: {reason}")
        self.tag = f"ee{os.getpid() % 100_000}x{next(_counter)}x{uuid.uuid4().hex[:6]}"
        self._seed = seed
        self.switch = f"{self.tag}-sw"
        self._relays: dict[int, subprocess.Popen[bytes]] = {}
        self._made: list[str] = []
        self.hosts = [Host(i, f"{self.tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(n)]
        try:
            self._build()
            for i in range(n):
                if delays[i] or losses[i]:
                    self.impair(i, delay_ms=delays[i], loss=losses[i])
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> TestNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- faults -----------------------------------------------------------------------
    def partition(self, host: int) -> None:
        """Cut ``host`` off the bridge (its link goes down; its processes keep running)."""
        _ip("-n", self.switch, "link", "set", f"v{self._index(host)}", "down")

    def heal(self, host: int) -> None:
        """Undo :meth:`partition`."""
        _ip("-n", self.switch, "link", "set", f"v{self._index(host)}", "up")

    def impair(self, host: int, *, delay_ms: float = 0.0, loss: float = 0.0) -> None:
        """Set ``host``'s egress delay and loss from now on (0 and 0: a direct port again)."""
        i = self._index(host)
        delay = _per_host("delay_ms", delay_ms, 1, upper=60_000.0)[0]
        drop = _per_host("loss", loss, 1, upper=1.0)[0]
        old = self._relays.pop(i, None)
        if old is not None:
            _stop(old)
        sw = ("-n", self.switch)
        if not delay and not drop:
            _ip(*sw, "link", "set", f"v{i}", "master", "br0")
            return
        _ip(*sw, "link", "set", f"v{i}", "nomaster")
        argv = [
            sys.executable,
            __file__,  # as a script: the relay imports only the standard library
            f"v{i}",
            f"d{i}",
            repr(delay / 1000.0),
            repr(drop),
            str(self._seed * 1000 + i),
        ]
        self._relays[i] = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, *argv], stdout=subprocess.PIPE
        )
        ready = self._relays[i].stdout
        assert ready is not None
        if ready.readline().strip() != b"ready":
            raise RuntimeError(f"the relay of host {i} did not start")

    # ---- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process in the namespaces, delete them (idempotent, never raises)."""
        for relay in self._relays.values():
            _stop(relay)
        self._relays.clear()
        for netns in reversed(self._made):
            with contextlib.suppress(Exception):
                pids = _ip("netns", "pids", netns, check=False).stdout.split()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for host in self.hosts:
            for proc in host._procs:
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.wait(timeout=5)
            host._procs.clear()
        for netns in reversed(self._made):
            _ip("netns", "del", netns, check=False)
        self._made.clear()

    # ---- building -----------------------------------------------------------------------
    def _index(self, host: int) -> int:
        if isinstance(host, bool) or not isinstance(host, int):
            raise TypeError(f"host must be an int index, got {type(host).__name__}")
        if not 0 <= host < len(self.hosts):
            raise ValueError(f"host must be in 0..{len(self.hosts) - 1}, got {host}")
        return host

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._netns(self.switch)
        sw = ("-n", self.switch)
        _ip(*sw, "link", "add", "br0", "type", "bridge")
        _ip(*sw, "link", "set", "br0", "up")
        for host in self.hosts:
            i = host.index
            self._netns(host.netns)
            # both ends made inside the namespaces: nothing appears in the caller's namespace
            _ip(
                *sw,
                "link",
                "add",
                f"v{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            )
            # a spare pair for a relay: d<i> is the relay's end, b<i> its bridge port
            _ip(*sw, "link", "add", f"d{i}", "type", "veth", "peer", "name", f"b{i}")
            _ip(*sw, "link", "set", f"b{i}", "master", "br0")
            for dev in (f"v{i}", f"d{i}", f"b{i}"):
                _ip(*sw, "link", "set", dev, "up")
            _ip(*sw, "link", "set", f"v{i}", "master", "br0")
            h = ("-n", host.netns)
            # no segmentation offload: every frame a relay reads fits the link's MTU
            _ip(*h, "link", "set", "eth0", "gso_max_size", "1500", "gso_max_segs", "1")
            _ip(*h, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*h, "link", "set", "eth0", "up")


def _per_host(name: str, value: float | Sequence[float], n: int, *, upper: float) -> list[float]:
    values = [value] * n if isinstance(value, int | float) else list(value)
    if len(values) != n:
        raise ValueError(f"{name} needs one value or {n}, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{name} values must be numbers, got {type(v).__name__}")
        if not 0.0 <= v <= upper:
            raise ValueError(f"{name} values must be in 0..{upper:g}, got {v}")
    return [float(v) for v in values]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(Exception):
        proc.kill()
        proc.wait(timeout=5)


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    sock.bind((ifname, _ETH_P_ALL))
    sock.setblocking(False)
    return sock


def _checksum(data: bytes) -> bytes:
    """The Internet checksum of ``data`` (RFC 1071), as the two bytes to store.

    Summed in native byte order and stored the same way: the one's-complement sum does not
    depend on the byte order."""
    if len(data) % 2:
        data += b"\0"
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return struct.pack("=H", ~total & 0xFFFF)


def with_checksum(frame: bytes) -> bytes:
    """``frame`` with its IPv4 TCP/UDP checksum filled in.

    A veth sender offloads the checksum (the kernel fills it in later, if ever); a frame read
    from a packet socket and sent again through another one would arrive with a wrong one.
    """
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ip = 14
    ihl = (frame[ip] & 0x0F) * 4
    proto = frame[ip + 9]
    offset = {6: 16, 17: 6}.get(proto)
    total = int.from_bytes(frame[ip + 2 : ip + 4], "big")
    if offset is None or int.from_bytes(frame[ip + 6 : ip + 8], "big") & 0x1FFF:
        return frame  # not TCP/UDP, or a later fragment
    seg_start, seg_end = ip + ihl, ip + total
    if seg_end > len(frame) or seg_end - seg_start < offset + 2:
        return frame
    seg = bytearray(frame[seg_start:seg_end])
    seg[offset : offset + 2] = b"\0\0"
    pseudo = frame[ip + 12 : ip + 20] + bytes([0, proto]) + len(seg).to_bytes(2, "big")
    seg[offset : offset + 2] = _checksum(pseudo + bytes(seg))
    return frame[:seg_start] + bytes(seg) + frame[seg_end:]


def relay(host_side: str, bridge_side: str, delay_s: float, loss: float, seed: int) -> None:
    """Carry frames between two interfaces: host -> bridge after ``delay_s``, dropped with
    probability ``loss``; bridge -> host at once. Runs in the switch namespace until killed
    (or for :data:`_RELAY_LIFETIME_S`)."""
    rng = random.Random(seed)
    a, b = _packet_socket(host_side), _packet_socket(bridge_side)
    due: list[tuple[float, int, bytes]] = []  # (send time, order, frame) for the bridge side
    order = itertools.count()
    print("ready", flush=True)
    end = time.monotonic() + _RELAY_LIFETIME_S
    while time.monotonic() < end:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, frame = heapq.heappop(due)
            with contextlib.suppress(OSError):
                b.send(frame)
        wait = max(0.0, due[0][0] - now) if due else 0.5
        readable, _, _ = select.select([a, b], [], [], wait)
        for sock in readable:
            for _ in range(64):  # drain a burst, bounded
                try:
                    frame, addr = sock.recvfrom(65536)
                except OSError:  # nothing left, or the link is down (a partition)
                    break
                if addr[2] == _PACKET_OUTGOING:
                    continue  # our own send, seen again
                frame = with_checksum(frame)
                if sock is b:
                    with contextlib.suppress(OSError):
                        a.send(frame)
                elif rng.random() >= loss and len(due) < _RELAY_QUEUE:
                    heapq.heappush(due, (time.monotonic() + delay_s, next(order), frame))


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
