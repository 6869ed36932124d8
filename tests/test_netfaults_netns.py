"""The test-host harness itself (elastic_ep.testing.netns): hosts reach each other over the
bridge, a partition cuts one off without closing its sockets and heals, an impaired host's
frames arrive late (and TCP still delivers every byte through loss), teardown leaves nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_ep.testing.netns import TestNetwork, unavailable_reason, with_checksum

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"no test hosts: {unavailable_reason()}"
)

# A server on host 0 that echoes the byte count of each connection; a client that sends
# N bytes (retrying a refused connect while the server starts) and prints how long the connect
# took and whether the count came back.
SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000)); s.listen(); s.settimeout(30)
for _ in range(int(sys.argv[2])):
    c, _ = s.accept(); c.settimeout(30); n = 0; want = int(c.recv(16).decode())
    while n < want:
        n += len(c.recv(1 << 20))
    c.sendall(str(n).encode().ljust(16)); c.close()
"""
CLIENT = r"""
import socket, sys, time
t = time.monotonic(); deadline = t + float(sys.argv[3])
while True:  # refused until the server (started just before) listens; bounded by the timeout
    try:
        c = socket.create_connection((sys.argv[1], 9000), timeout=max(0.1, deadline - time.monotonic()))
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
connect = time.monotonic() - t; n = int(sys.argv[2])
c.sendall(str(n).encode().ljust(16)); c.sendall(b"x" * n)
print(connect, int(c.recv(16).decode()))
"""


def _send(net: TestNetwork, host: int, n: int, timeout_s: float = 10.0) -> tuple[float, int]:
    out = net.hosts[host].run(
        [sys.executable, "-c", CLIENT, net.hosts[0].address, str(n), str(timeout_s)],
        timeout_s=timeout_s + 20,
    )
    if out.returncode:
        raise ConnectionError(out.stderr.strip().splitlines()[-1])
    connect, got = out.stdout.split()
    return float(connect), int(got)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_hosts_connect_partition_heal_and_teardown() -> None:
    with TestNetwork(3) as net:
        assert [h.address for h in net.hosts] == ["10.213.0.1", "10.213.0.2", "10.213.0.3"]
        mine = {n for n in _namespaces() if n.startswith(net.tag)}
        assert len(mine) == 4  # three hosts and the switch
        server = net.hosts[0].popen([sys.executable, "-c", SERVER, net.hosts[0].address, "3"])
        assert _send(net, 1, 1_000_000)[1] == 1_000_000
        net.partition(2)
        with pytest.raises(ConnectionError, match="timed out"):
            _send(net, 2, 10, timeout_s=1.0)  # no reset, no refusal: silence
        net.heal(2)
        assert _send(net, 2, 2_000_000)[1] == 2_000_000
        assert _send(net, 1, 10)[1] == 10
        assert server.wait(timeout=30) == 0
    assert not {n for n in _namespaces() if n.startswith(net.tag)}


def test_delay_and_loss_slow_a_host_but_tcp_delivers_every_byte() -> None:
    with TestNetwork(2, delay_ms=[0.0, 100.0], loss=[0.0, 0.05], seed=3) as net:
        server = net.hosts[0].popen([sys.executable, "-c", SERVER, net.hosts[0].address, "1"])
        connect_s, got = _send(net, 1, 3_000_000, timeout_s=20)
        assert got == 3_000_000
        assert connect_s >= 0.1  # the SYN left host 1 100 ms late (a lower bound: no flake)
        assert server.wait(timeout=30) == 0
        net.impair(1)  # a direct port again
        assert net._relays == {}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match=r"1\.\.250"):
        TestNetwork(0)
    with pytest.raises(ValueError, match="one value or 2"):
        TestNetwork(2, delay_ms=[1.0])
    with pytest.raises(ValueError, match=r"loss values must be in 0\.\.1"):
        TestNetwork(1, loss=2.0)


def test_checksum_of_a_known_tcp_frame() -> None:
    # A SYN from 10.213.0.2:50000 to 10.213.0.1:9000 with its checksum zeroed, checked against
    # RFC 1071 summed big-endian here (the harness sums in native order).
    eth = bytes(12) + b"\x08\x00"
    ip = bytes.fromhex("45000028000140004006" + "0000" + "0ad50002" + "0ad50001")
    tcp = bytes.fromhex("c3502328" + "00000001" + "00000000" + "5002faf0" + "0000" + "0000")
    frame = with_checksum(eth + ip + tcp)
    seg = frame[34:]
    pseudo = ip[12:20] + b"\x00\x06" + len(seg).to_bytes(2, "big")
    data = pseudo + seg
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF  # a correct checksum makes the one's-complement sum all ones
    assert frame[:50] == (eth + ip + tcp)[:50]
