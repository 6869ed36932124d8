"""The job's TCPStore listens on the address it is given only (docs/security.md)."""

from __future__ import annotations

import contextlib
import socket

import pytest

from elastic_ep.groups import Rendezvous


def _non_loopback_address() -> str | None:
    """An address of this machine other than loopback (no packet is sent), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        address = str(probe.getsockname()[0])
        if not address.startswith("127."):
            return address
    return None


def test_store_on_loopback_is_not_reachable_from_other_interfaces() -> None:
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    master = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, master.port), timeout=5).close()
        client = Rendezvous("127.0.0.1", master.port, is_master=False, timeout_s=5)
        client.store.set("k", "v")
        assert master.store.get("k") == b"v"
        client.close()
    finally:
        master.close()


def test_store_on_a_taken_port_fails_clearly() -> None:
    master = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=5)
    try:
        with pytest.raises(OSError, match="in use"):
            Rendezvous("127.0.0.1", master.port, is_master=True, timeout_s=5)
    finally:
        master.close()
