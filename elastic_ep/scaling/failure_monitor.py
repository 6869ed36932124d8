"""The coordinator's watch over the serving ranks: death marks and recoveries.

A monitor thread of the :class:`~elastic_ep.scaling.coordinator.ElasticCoordinator` looks every
``poll_interval_s`` at

- the rank processes: one that died (and is not a leaver that reported its commit) is marked
  dead in the store (``ControlChannel.mark_dead``: the ranks' death watchers wake at once, so
  survivors need not wait out a timeout), and the status turns to ``recovering`` (a scale or
  rebalance in flight is marked failed: its driver sees it and ends);
- the recoveries the ranks announce (``ctl/recovery/<n>``): a survivor's completed report sets
  the new epoch, members and lost experts; a failed one ends the recovery as ``failed``;
- a recovery that never reports within 3x the group timeout + 10 s: ``failed``, so later
  requests are not refused forever.

:class:`FailureMonitor` is a part of the coordinator (a base class of it): its methods share the
coordinator's lock, status and process handles.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from elastic_ep.scaling.channel import Command, ControlChannel
from elastic_ep.scaling.launcher import RankHandle
from elastic_ep.scaling.phase import ScalePhase
from elastic_ep.scaling.status import EventKind, ScaleStatus


class FailureMonitor:
    """The monitor thread's checks (see the module docstring)."""

    _channel: ControlChannel
    _lock: threading.RLock
    _stop: threading.Event
    _poll_s: float
    _timeout_s: float
    _status: ScaleStatus
    _handles: dict[int, RankHandle]
    _running: Command | None
    _recoveries_seen: int
    _recovering_since: float | None
    _recovered: set[int]
    _set_phase: Callable[..., None]

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._check_processes()
                self._check_recoveries()
                self._check_recovery_deadline()
            except Exception:
                if self._stop.is_set():
                    return
                raise

    def _left(self, member: int, cmd: Command | None) -> bool:
        """Whether ``member`` is a leaver of ``cmd`` that reported its commit (it exits on
        purpose then; before that report, its death is a failure)."""
        if cmd is None or member not in cmd.leavers:
            return False
        report = self._channel.reports(cmd.epoch, (member,)).get(member)
        return report is not None and report.phase is ScalePhase.COMPLETED

    def _check_processes(self) -> None:
        with self._lock:
            serving = self._status.members
            phase = self._status.phase
            cmd = self._running
        for m in serving:
            handle = self._handles.get(m)
            if (
                handle is None
                or handle.is_alive()
                or self._channel.is_marked_dead(m)
                or self._left(m, cmd)
            ):
                continue
            self._channel.mark_dead(m)
            with self._lock:
                event = self._status.event
                if phase.is_active and event is not None and event.is_requested:
                    # the event's driver sees RECOVERY, aborts and ends the event as failed
                    self._set_phase(
                        ScalePhase.FAILED, error=f"member {m} died during the {event.value}"
                    )
                self._set_phase(
                    ScalePhase.RECOVERING,
                    event=EventKind.RECOVERY,
                    dead_members=(m,),
                    error=None,
                    phase_s=(),
                    blocking_s=None,
                    balance_before=None,
                    balance_after=None,
                    experts_moved=None,
                )

    def _check_recovery_deadline(self) -> None:
        """A recovery that never reports (e.g. every survivor failed) ends as FAILED, so later
        requests are not refused forever."""
        with self._lock:
            if self._status.phase is not ScalePhase.RECOVERING:
                self._recovering_since = None
                return
            if self._recovering_since is None:
                self._recovering_since = time.monotonic()
            elif time.monotonic() - self._recovering_since > 3 * self._timeout_s + 10.0:
                self._set_phase(
                    ScalePhase.FAILED,
                    members=(),
                    error=f"no survivor reported a recovery within {3 * self._timeout_s + 10:g} s "
                    "(3x the group timeout + 10 s): every survivor died or lost the store",
                )

    def _check_recoveries(self) -> None:
        for epoch in self._channel.recoveries(self._recoveries_seen):
            self._recoveries_seen += 1
            if epoch in self._recovered:
                continue  # every survivor of a failed recovery lists it
            with self._lock:
                candidates = tuple(sorted(set(self._handles) | set(self._status.members)))
            reports = self._channel.reports(epoch, candidates)
            done = [r for r in reports.values() if r.phase is ScalePhase.COMPLETED]
            with self._lock:  # a rank that split off the serving world does not speak for it
                serving = set(self._status.members)
            failed = [
                r for r in reports.values() if r.phase is ScalePhase.FAILED and r.member in serving
            ]
            if not done and not failed:
                continue
            self._recovered.add(epoch)
            with self._lock:
                if self._status.phase is not ScalePhase.RECOVERING:
                    self._set_phase(ScalePhase.RECOVERING, event=EventKind.RECOVERY)
            if not done:
                with self._lock:
                    self._set_phase(  # the survivors exit: no rank serves any more
                        ScalePhase.FAILED,
                        members=(),
                        dead_members=failed[0].dead_members,
                        error=f"recovery failed: {failed[0].error}",
                    )
                continue
            any_report = done[0]
            for m, handle in list(self._handles.items()):
                if m not in any_report.members:  # the dead, and joiners of an uncommitted scale
                    del self._handles[m]
                    if not handle.join(0.0):
                        handle.kill()
            blocking = [r.blocking_s for r in done if r.blocking_s is not None]
            with self._lock:
                self._set_phase(
                    ScalePhase.COMPLETED,
                    epoch=epoch,
                    members=any_report.members,
                    phase_s=any_report.phase_s,
                    blocking_s=max(blocking, default=None),
                    lost_experts=any_report.lost_experts,
                    dead_members=any_report.dead_members,
                )
