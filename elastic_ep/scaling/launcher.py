"""Launchers: how the coordinator starts a rank process (the initial ranks and every joiner).

A launcher starts ``entry(spec)`` somewhere with a :class:`RankSpec` telling the process where
the job's TCPStore is, its member id and the epoch it enters. The default
:class:`LocalProcessLauncher` starts local processes; :mod:`elastic_ep.scaling.ray_launcher` starts
Ray actors. The coordinator only needs :class:`RankHandle`'s liveness, kill and bounded join.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class RankRole(Enum):
    """Whether a process starts with the job or joins a running world."""

    INITIAL = "initial"
    JOINER = "joiner"


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank process needs to enter the job (picklable).

    Attributes:
        store_host / store_port: the job's TCPStore (hosted by the coordinator).
        member_id: this process's stable member id.
        epoch: the epoch it enters (its groups' key prefix).
        members: member ids of that epoch, in rank order (this one included).
        role: initial rank or joiner.
        config: the engine's own picklable settings (model size, seeds, ...), passed through.
    """

    store_host: str
    store_port: int
    member_id: int
    epoch: int
    members: tuple[int, ...]
    role: RankRole
    config: Any = None
    timeout_s: float = 30.0

    @property
    def rank(self) -> int:
        """This process's rank in ``epoch``."""
        return self.members.index(self.member_id)


class RankHandle(Protocol):
    """A launched rank process as the coordinator sees it."""

    member_id: int

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to end; return whether it ended."""
        ...


class Launcher(Protocol):
    """Starts rank processes."""

    def launch(self, spec: RankSpec) -> RankHandle: ...


def _run_entry(entry: Callable[[RankSpec], Any], spec: RankSpec) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        entry(spec)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


@dataclass
class LocalProcess:
    """A rank running as a local process (:class:`RankHandle`)."""

    member_id: int
    process: Any = field(repr=False)

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    @property
    def exitcode(self) -> int | None:
        code: int | None = self.process.exitcode
        return code

    def kill(self) -> None:
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5)

    def join(self, timeout_s: float) -> bool:
        self.process.join(timeout=timeout_s)
        return not self.process.is_alive()


class LocalProcessLauncher:
    """Start each rank as a local process running ``entry(spec)``.

    Args:
        entry: a module-level function (pickled by reference).
        start_method: multiprocessing start method; ``forkserver`` (default) reuses a server
            that has already imported torch, so a joiner starts in well under a second.
    """

    def __init__(
        self, entry: Callable[[RankSpec], Any], *, start_method: str = "forkserver"
    ) -> None:
        if not callable(entry):
            raise TypeError("entry must be callable")
        self._entry = entry
        self._ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["torch", "elastic_ep"])

    def launch(self, spec: RankSpec) -> LocalProcess:
        proc = self._ctx.Process(
            target=_run_entry,
            args=(self._entry, spec),
            name=f"rank-member-{spec.member_id}",
            daemon=True,
        )
        proc.start()
        return LocalProcess(spec.member_id, proc)
