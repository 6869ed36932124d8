"""The multi-rank benchmarks' launcher: one spawned process per rank, around a store the parent
serves.

The parent binds the store's port as it starts (a port picked first and bound later by a rank
could be taken in between). Every rank runs ``target(rank, port, *args)``; what it returns comes
back to the parent. Modelled on ``tests/procs.run_ranks``; used by ``bench_barrier``,
``bench_connect``, ``bench_executor``, ``bench_groups``, ``bench_nccl_patterns`` and
``bench_scaling`` (its floors).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from typing import Any

from elastic_ep.groups import Rendezvous


def run_ranks(
    target: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 900.0
) -> list[Any]:
    """Run ``target(rank, port, *args)`` in ``world_size`` spawned processes (``port``: the
    store's, on 127.0.0.1) and return every rank's result, in rank order.

    Raises:
        RuntimeError: a rank exited without a result, or ``timeout_s`` passed first; every
            rank still alive is killed then.
    """
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    results = ctx.Queue()
    server = Rendezvous("127.0.0.1", 0, is_master=True, timeout_s=300)
    procs = [
        ctx.Process(target=_rank, args=(target, rank, server.port, args, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                rank, result = results.get(timeout=0.5)
                got[rank] = result
            except queue.Empty:
                failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode not in (None, 0)}
                if failed:
                    message = f"ranks exited without a result (exit codes {failed})"
                    raise RuntimeError(message) from None
                if time.monotonic() > deadline:
                    message = f"the ranks gave no result within {timeout_s:g} s"
                    raise RuntimeError(message) from None
    finally:
        for p in procs:
            p.join(timeout=60 if len(got) == world_size else 0)
            if p.is_alive():
                p.kill()
        server.close()
    return [got[rank] for rank in range(world_size)]


def _rank(
    target: Callable[..., Any], rank: int, port: int, args: tuple[Any, ...], results: Any
) -> None:
    results.put((rank, target(rank, port, *args)))
