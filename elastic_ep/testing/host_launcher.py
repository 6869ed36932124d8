"""ForkServerLauncher: start ranks on test hosts in milliseconds, from one fork server per host.

A fresh ``python`` per rank pays the interpreter and torch imports (seconds on a small machine),
which dominates a fault sweep's trials. A fork server runs on each host (started through a
command prefix such as ``ip netns exec <host>``), imports torch and the rank's entry once, and
forks a rank per request. The rank gets the torchrun-style environment of
:meth:`~elastic_ep.scaling.RankSpec.to_env` (``MASTER_ADDR``, ``RANK``, ...) and runs
``entry(RankSpec.from_env())``. The server ignores ``SIGCHLD``, so its ranks are reaped at exit;
a handle sees a rank as alive while its pid exists.

Protocol on the server's stdin/stdout: one JSON object per line (``{"env": {...}}``), answered
by the child's pid on one line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic_ep.scaling.launcher import RankSpec


@dataclass
class ForkedRank:
    """A rank forked by a host's fork server (:class:`~elastic_ep.scaling.RankHandle`)."""

    member_id: int
    pid: int

    def is_alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.join(5.0)

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.is_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


class ForkServerLauncher:
    """Launch each rank from the fork server of its host (a :class:`~elastic_ep.scaling.Launcher`).

    Args:
        entry: ``"module:function"``, the rank's entry (called with its ``RankSpec``).
        prefixes: per host, the command prefix that runs a process there (``[]`` for this
            host, ``["ip", "netns", "exec", ns]`` for a test host).
        host_of: ``member_id -> host index``.
    """

    def __init__(
        self, entry: str, prefixes: Sequence[Sequence[str]], host_of: Callable[[int], int]
    ) -> None:
        if entry.count(":") != 1:
            raise ValueError(f"entry must be 'module:function', got {entry!r}")
        self._host_of = host_of
        self.launched: list[ForkedRank] = []
        self._servers = [
            subprocess.Popen(
                [*prefix, sys.executable, "-m", "elastic_ep.testing.host_launcher", entry],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for prefix in prefixes
        ]
        for server in self._servers:
            if _readline(server) != "ready":
                self.close()
                raise RuntimeError("a fork server did not start")

    def launch(self, spec: RankSpec) -> ForkedRank:
        server = self._servers[self._host_of(spec.member_id)]
        assert server.stdin is not None
        server.stdin.write((json.dumps({"env": spec.to_env()}) + "\n").encode())
        server.stdin.flush()
        rank = ForkedRank(spec.member_id, int(_readline(server)))
        self.launched.append(rank)
        return rank

    def kill_all(self) -> None:
        """SIGKILL every rank launched so far (stopped ones too)."""
        for rank in self.launched:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank.pid, signal.SIGKILL)
        self.launched.clear()

    def close(self) -> None:
        """Kill the ranks and the servers."""
        self.kill_all()
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.kill()
                server.wait(timeout=5)


def _readline(server: subprocess.Popen[bytes]) -> str:
    assert server.stdout is not None
    return server.stdout.readline().decode().strip()


def _serve(entry: str) -> None:
    module, function = entry.split(":")
    target = getattr(importlib.import_module(module), function)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked ranks are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(2, 1)  # the protocol's stdout is not the rank's
            os.environ.update(request["env"])
            code = 0
            try:
                target(RankSpec.from_env())
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    _serve(sys.argv[1])
