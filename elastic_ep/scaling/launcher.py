"""Launchers: how the coordinator starts a rank process (the initial ranks and every joiner).

A launcher starts ``entry(spec)`` somewhere with a :class:`RankSpec` telling the process where
the job's TCPStore is, its member id and the epoch it enters. The default
:class:`LocalProcessLauncher` starts local processes; :class:`CommandLauncher` runs a command per
rank the way torchrun does (the store's address in ``MASTER_ADDR``/``MASTER_PORT``, the rank in
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; the process calls :meth:`RankSpec.from_env`), e.g. through
``ssh`` or ``ip netns exec`` on another host; :mod:`elastic_ep.scaling.ray_launcher` starts Ray
actors. The coordinator only needs :class:`RankHandle`'s liveness, kill and bounded join.
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
        timeout_s: the group timeout (bound on every group operation).
        arrival_timeout_s: how long the first group build waits for the other ranks of
            ``members`` to arrive: ranks launched together start up (interpreter, imports, the
            engine's own loading) seconds apart, which is no failure; ``None``: ``timeout_s``.
            The coordinator sets its start timeout on the initial ranks (a scale's groups wait
            for its joiners up to the scale's timeout: ``build_next_groups``).
    """

    store_host: str
    store_port: int
    member_id: int
    epoch: int
    members: tuple[int, ...]
    role: RankRole
    config: Any = None
    timeout_s: float = 30.0
    arrival_timeout_s: float | None = None

    @property
    def rank(self) -> int:
        """This process's rank in ``epoch``."""
        return self.members.index(self.member_id)

    def to_env(self, local_rank: int = 0) -> dict[str, str]:
        """The torchrun-style environment of this rank (read back by :meth:`from_env`)."""
        return {
            "MASTER_ADDR": self.store_host,
            "MASTER_PORT": str(self.store_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(len(self.members)),
            "LOCAL_RANK": str(local_rank),
            SPEC_ENV: base64.b64encode(pickle.dumps(self)).decode(),
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RankSpec:
        """The spec of a rank started by :class:`CommandLauncher` (from ``os.environ``).

        ``MASTER_ADDR``/``MASTER_PORT`` name the store (they win over the launcher's address,
        as under torchrun); ``RANK`` and ``WORLD_SIZE`` must agree with the spec.

        Raises:
            ValueError: a variable is missing or disagrees.
        """
        env = os.environ if environ is None else environ
        missing = [
            k
            for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", SPEC_ENV)
            if k not in env
        ]
        if missing:
            raise ValueError(f"not started by a CommandLauncher: {missing} not set")
        spec = pickle.loads(base64.b64decode(env[SPEC_ENV]))
        if not isinstance(spec, RankSpec):
            raise ValueError(f"{SPEC_ENV} holds {type(spec).__name__}, not a RankSpec")
        if (env["RANK"], env["WORLD_SIZE"]) != (str(spec.rank), str(len(spec.members))):
            raise ValueError(
                f"RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']} disagree with the spec "
                f"(rank {spec.rank} of {len(spec.members)})"
            )
        try:
            port = int(env["MASTER_PORT"])
        except ValueError:
            raise ValueError(f"MASTER_PORT must be an int, got {env['MASTER_PORT']!r}") from None
        return replace(spec, store_host=env["MASTER_ADDR"], store_port=port)


SPEC_ENV = "ELASTIC_EP_RANK_SPEC"
"""The environment variable holding a :class:`RankSpec` (pickled, base64) for
:meth:`RankSpec.from_env`."""


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
            # another thread's is_alive() may reap it between the check and the signal
            with contextlib.suppress(ProcessLookupError):
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


@dataclass
class CommandProcess:
    """A rank started by :class:`CommandLauncher` (:class:`RankHandle`)."""

    member_id: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # SIGKILL: also ends a stopped (SIGSTOP) process
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def join(self, timeout_s: float) -> bool:
        try:
            self.process.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            return False
        return True


class CommandLauncher:
    """Start each rank as a command, the way torchrun does.

    The command gets this process's environment plus ``env``, the store's address in
    ``MASTER_ADDR``/``MASTER_PORT``, ``RANK``/``WORLD_SIZE`` of the epoch it enters,
    ``LOCAL_RANK`` and the full :class:`RankSpec` (read it with :meth:`RankSpec.from_env`).

    Args:
        command: ``spec -> argv``, e.g. ``["ssh", host, "python", "-m", "my_engine"]`` or
            ``["ip", "netns", "exec", ns, "python", "-m", "my_engine"]`` for the rank's host.
        local_rank: ``spec -> LOCAL_RANK`` (its index on its host); default 0.
        env: extra environment for every rank.
    """

    def __init__(
        self,
        command: Callable[[RankSpec], Sequence[str]],
        *,
        local_rank: Callable[[RankSpec], int] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not callable(command):
            raise TypeError("command must be callable")
        self._command = command
        self._local_rank = local_rank or (lambda spec: 0)
        self._env = dict(env or {})

    def launch(self, spec: RankSpec) -> CommandProcess:
        argv = [str(a) for a in self._command(spec)]
        if not argv:
            raise ValueError(f"empty command for member {spec.member_id}")
        env = {**os.environ, **self._env, **spec.to_env(self._local_rank(spec))}
        return CommandProcess(spec.member_id, subprocess.Popen(argv, env=env))
