"""ControlChannel: the typed messages between the coordinator and the ranks, over the TCPStore.

Keys (all under ``ctl/``):

- ``seq``: counter of published commands; ``cmd/<seq>``: the pickled :class:`Command`.
- ``abort/<seq>``: set by the coordinator to abandon a running scale (e.g. a joiner died).
- ``report/<epoch>/<member>``: a rank's :class:`RankReport` about the event that made ``epoch``;
  a final one (completed, rolled back, failed) also goes to ``report/<epoch>/final/<n>``, ``n``
  counted by ``report/<epoch>/final``, so a :class:`ReportCollector` reads each report once
  (O(R) reads per event) instead of every member's key at every look (O(R) per look).
- ``world``: the serving ``(epoch, members)``, written by the leader at each commit.
- ``dead/<member>``: the coordinator saw that member's process die (speeds up recovery);
  ``dead/count``: how many marks there are; ``dead/n/<n>``: the member of the n-th mark, which
  a rank's ``deaths.DeathWatcher`` waits for (the server wakes it: no per-step reads).
- ``recovery/count`` and ``recovery/<n>``: the epochs made by recoveries, in order.

Ranks read the store without blocking (``add(key, 0)``, ``check``); every blocking read has a
timeout. Values are pickled: the store is private to the job, whose processes trust each other.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, TypeVar, cast

from torch.distributed import Store

from elastic_ep.scaling.gate import GateMode
from elastic_ep.scaling.phase import ScalePhase


class CommandKind(Enum):
    SCALE = "scale"  # change the members (stage, commit or roll back)
    REBALANCE = "rebalance"  # same members, new placement (staged and committed like a scale)
    STOP = "stop"  # every rank leaves its serving loop (job shutdown)


@dataclass(frozen=True)
class Command:
    """One instruction for the ranks, identified by its sequence number.

    Attributes:
        seq: 1, 2, ... in publication order.
        kind: what to do.
        epoch: the fresh epoch the scale or rebalance builds (unused for STOP).
        old_members / new_members: member ids before and after, in rank order (the same for a
            rebalance).
        mode: traffic-gate mode while the scale or rebalance runs.
        timeout_s: bound on the scale work (and on draining).
    """

    seq: int
    kind: CommandKind
    epoch: int = -1
    old_members: tuple[int, ...] = ()
    new_members: tuple[int, ...] = ()
    mode: GateMode = GateMode.DRAIN
    timeout_s: float = 60.0

    @property
    def joiners(self) -> tuple[int, ...]:
        old = set(self.old_members)
        return tuple(m for m in self.new_members if m not in old)

    @property
    def leavers(self) -> tuple[int, ...]:
        new = set(self.new_members)
        return tuple(m for m in self.old_members if m not in new)


@dataclass(frozen=True)
class RankReport:
    """What one rank says about the event that made (or tried to make) ``epoch``.

    Attributes:
        epoch: the event's new epoch.
        member: the reporting member id.
        phase: the last phase this rank reached (``COMPLETED``, ``ROLLED_BACK``, ``FAILED`` are
            final).
        phase_s: seconds per phase on this rank.
        blocking_s: seconds this rank could not run a forward step.
        kv_budget_bytes: the agreed KV budget, when the event synced it.
        lost_experts: (layer, expert) pairs reloaded (recovery).
        members: the new epoch's members (recovery: the survivors).
        dead_members: members declared dead (recovery).
        error: why the event failed on this rank.
        balance_before / balance_after: balancedness of the placements before and after under
            the planned-for load (scale or rebalance), ``None`` when unknown.
        experts_moved: expert weights received over the network by all ranks (scale or
            rebalance), ``None`` when unknown.
    """

    epoch: int
    member: int
    phase: ScalePhase
    phase_s: tuple[tuple[ScalePhase, float], ...] = ()
    blocking_s: float | None = None
    kv_budget_bytes: int | None = None
    lost_experts: int = 0
    members: tuple[int, ...] = ()
    dead_members: tuple[int, ...] = ()
    error: str | None = None
    balance_before: float | None = None
    balance_after: float | None = None
    experts_moved: int | None = None


_FINAL = (ScalePhase.COMPLETED, ScalePhase.ROLLED_BACK, ScalePhase.FAILED)


def _dump(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def put(store: Store, key: str, data: bytes) -> None:
    """``store.set`` with raw bytes (torch's stubs say ``str``; the store takes bytes)."""
    store.set(key, cast(str, data))


STORE_RETRY_S = 1.0
"""After a failed store read, how long :meth:`ControlChannel.read_or` answers its default
before it asks the store again."""

_T = TypeVar("_T")


class ControlChannel:
    """Typed reads and writes of the ``ctl/`` keys on the job's store."""

    def __init__(self, store: Store, timeout_s: float = 30.0) -> None:
        self._store = store
        self._timeout = timedelta(seconds=timeout_s)
        self._retry_at = 0.0  # a read failed: answer defaults until then

    def read_or(self, read: Callable[[], _T], default: _T) -> _T:
        """``read()``, or ``default`` while the store fails (asked again every
        :data:`STORE_RETRY_S`). A rank's per-step reads go through this: without the
        coordinator's store the ranks keep serving their epoch, seeing no new command and no
        death mark."""
        if time.monotonic() < self._retry_at:
            return default
        try:
            return read()
        except RuntimeError:
            self._retry_at = time.monotonic() + STORE_RETRY_S
            return default

    # ---- commands ---------------------------------------------------------------------
    def next_seq(self) -> int:
        """Reserve the next command number (coordinator)."""
        return int(self._store.add("ctl/seq_reserved", 1))

    def publish(self, command: Command) -> None:
        """Make ``command`` visible to the ranks (its seq must come from :meth:`next_seq`)."""
        put(self._store, f"ctl/cmd/{command.seq}", _dump(command))
        # ``seq`` only ever grows; ranks read it without blocking.
        current = self.latest_seq()
        if command.seq > current:
            self._store.add("ctl/seq", command.seq - current)

    def latest_seq(self) -> int:
        """Highest published command number, 0 if none (non-blocking)."""
        return int(self._store.add("ctl/seq", 0))

    def command(self, seq: int) -> Command:
        self._store.wait([f"ctl/cmd/{seq}"], self._timeout)
        cmd = pickle.loads(self._store.get(f"ctl/cmd/{seq}"))
        if not isinstance(cmd, Command):
            raise TypeError(f"ctl/cmd/{seq} holds {type(cmd).__name__}, not a Command")
        return cmd

    def abort(self, seq: int) -> None:
        put(self._store, f"ctl/abort/{seq}", b"1")

    def aborted(self, seq: int) -> bool:
        return bool(self._store.check([f"ctl/abort/{seq}"]))

    # ---- reports ----------------------------------------------------------------------
    def report(self, report: RankReport) -> None:
        data = _dump(report)
        put(self._store, f"ctl/report/{report.epoch}/{report.member}", data)
        if report.phase in _FINAL:
            n = int(self._store.add(f"ctl/report/{report.epoch}/final", 1))
            put(self._store, f"ctl/report/{report.epoch}/final/{n}", data)

    def collector(self, epoch: int, leader: int) -> ReportCollector:
        """A :class:`ReportCollector` of the event that makes ``epoch``."""
        return ReportCollector(self._store, epoch, leader)

    def reports(self, epoch: int, members: tuple[int, ...]) -> dict[int, RankReport]:
        """The reports present now for ``epoch`` from ``members`` (non-blocking)."""
        out: dict[int, RankReport] = {}
        for m in members:
            key = f"ctl/report/{epoch}/{m}"
            if self._store.check([key]):
                out[m] = pickle.loads(self._store.get(key))
        return out

    # ---- serving world ----------------------------------------------------------------
    def set_world(self, epoch: int, members: tuple[int, ...]) -> None:
        put(self._store, "ctl/world", _dump((epoch, tuple(members))))

    def world(self) -> tuple[int, tuple[int, ...]] | None:
        if not self._store.check(["ctl/world"]):
            return None
        epoch, members = pickle.loads(self._store.get("ctl/world"))
        return int(epoch), tuple(members)

    # ---- failures ---------------------------------------------------------------------
    def mark_dead(self, member: int) -> None:
        """Mark ``member`` dead: ``dead/<member>``, then the n-th mark ``dead/n/<n>`` (what a
        rank's ``DeathWatcher`` waits for; the coordinator is the only writer)."""
        put(self._store, f"ctl/dead/{member}", b"1")
        n = int(self._store.add("ctl/dead/count", 1))
        put(self._store, f"ctl/dead/n/{n}", str(member).encode())

    def dead_count(self) -> int:
        """How many members were marked dead so far (non-blocking, one store read)."""
        return int(self._store.add("ctl/dead/count", 0))

    def is_marked_dead(self, member: int) -> bool:
        return bool(self._store.check([f"ctl/dead/{member}"]))

    def add_recovery(self, epoch: int) -> None:
        n = int(self._store.add("ctl/recovery/count", 1))
        put(self._store, f"ctl/recovery/{n}", str(epoch).encode())

    def recoveries(self, start: int) -> list[int]:
        """Epochs made by recoveries number ``start + 1`` onwards (non-blocking)."""
        count = int(self._store.add("ctl/recovery/count", 0))
        return [int(self._store.get(f"ctl/recovery/{n}")) for n in range(start + 1, count + 1)]

    # ---- raw access for the recovery agreement ----------------------------------------
    @property
    def store(self) -> Store:
        return self._store


class ReportCollector:
    """The reports of one event, read incrementally: each look reads the count of final
    reports, the final reports not read before, and the leader's latest (its phases as they
    go): O(1) store operations per look plus one read per final report.

    Args:
        store: the job's store.
        epoch: the event's new epoch.
        leader: the member whose non-final reports give the event's phase.
    """

    def __init__(self, store: Store, epoch: int, leader: int) -> None:
        self._store = store
        self._epoch = epoch
        self._leader = leader
        self._read = 0
        self._final: dict[int, RankReport] = {}

    def poll(self) -> dict[int, RankReport]:
        """Member -> its report: every final one so far, and the leader's latest."""
        prefix = f"ctl/report/{self._epoch}/final"
        count = int(self._store.add(prefix, 0))
        while self._read < count:
            key = f"{prefix}/{self._read + 1}"
            if not self._store.check([key]):  # counted, not written yet: read it next time
                break
            report = pickle.loads(self._store.get(key))
            self._final[report.member] = report
            self._read += 1
        out = dict(self._final)
        leader_key = f"ctl/report/{self._epoch}/{self._leader}"
        if self._leader not in out and self._store.check([leader_key]):
            out[self._leader] = pickle.loads(self._store.get(leader_key))
        return out
