"""Run a function in N real processes (one per rank) with a hard deadline.

Used by the multi-process tests: every rank calls ``target(rank, world_size, port, *args)`` in its
own process; ``port`` is the loopback port of the job's TCPStore, whose server this process runs
(bound to a free port as it starts: a port picked first and bound later by a rank could be taken
in between), so every rank connects as a client (``is_master=False``). Results come back in rank
order. A rank that raises, dies, or outlives the deadline fails the call, and every child still
alive is killed, so a test can never hang.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from elastic_ep.groups import Rendezvous

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "numpy", "elastic_ep"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(
    target: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, out: Any
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
        out.put((rank, "ok", target(rank, world_size, port, *args)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))


class RankFailed(AssertionError):
    """A rank raised, died or timed out."""


def run_ranks(
    target: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    port: int | None = None,
    expect_dead: Sequence[int] = (),
) -> list[Any]:
    """Run ``target(rank, world_size, port, *args)`` in ``world_size`` processes.

    Args:
        target: a module-level function (it is pickled by reference).
        timeout: seconds for all ranks together; past it every child is killed.
        expect_dead: ranks that are expected to die (e.g. SIGKILL themselves); their missing
            result is ``None`` instead of a failure.
    Returns:
        the return value of each rank, in rank order.
    """
    server = None
    if port is None:
        server = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=timeout)
        port = server.port
    out = _CTX.Queue()
    procs = [
        _CTX.Process(target=_child, args=(target, r, world_size, port, args, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankFailed(f"ranks {missing} did not finish within {timeout} s")
            try:
                rank, status, value = out.get(timeout=min(0.2, remaining))
                results[rank] = (status, value)
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):
                if r not in results and not p.is_alive() and out.empty():
                    if r in expect_dead:
                        results[r] = ("ok", None)
                    else:
                        raise RankFailed(f"rank {r} died with exit code {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it may exit after is_alive()
                    os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=5)
        if server is not None:
            server.close()
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(results.items()) if s == "error"]
    if errors:
        raise RankFailed("\n".join(errors))
    return [results[r][1] for r in range(world_size)]
