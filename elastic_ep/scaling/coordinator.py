"""ElasticCoordinator: the controller side of elastic scaling.

It hosts the job's TCPStore, launches the ranks (initial ones and joiners) through a
:class:`~elastic_ep.scaling.launcher.Launcher`, validates scale requests, publishes them to the
ranks, follows their reports and exposes a :class:`ScaleStatus`. A :class:`RebalanceRequest`
(same members, a new placement for the engine's load) runs through the same machinery. One scale
or rebalance runs at a time: a second request while one runs raises :class:`ScaleConflict`. A
scale or rebalance that fails anywhere (a
joiner dies or never arrives, a timeout, a planner error) is rolled back by the ranks; the
coordinator kills the joiners it launched and reports ``rolled_back`` with the reason, and the
next request starts from a clean state. A monitor thread marks dead rank processes in the store
(so survivors need not wait out a timeout) and picks up recoveries
(:mod:`elastic_ep.scaling.failure_monitor`).

Once the ranks commit, the joiners are members: a death after the commit, even before every
report is in, starts a recovery of the new epoch, and the coordinator never kills a joiner it
cannot show was rolled back. A leaver that dies before it reports its commit is a dead member
like any other. A recovery that fails on the ranks (e.g. the survivors cannot hold every
expert) is reported ``failed`` with the ranks' error as soon as a survivor reports it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from torch.distributed import Store

from elastic_ep.errors import ElasticEPError
from elastic_ep.groups import Rendezvous
from elastic_ep.scaling.channel import Command, CommandKind, ControlChannel, RankReport
from elastic_ep.scaling.failure_monitor import FailureMonitor
from elastic_ep.scaling.launcher import Launcher, RankHandle, RankRole, RankSpec
from elastic_ep.scaling.phase import ScalePhase, check_transition
from elastic_ep.scaling.request import RebalanceRequest, ScaleLimits, ScaleRequest
from elastic_ep.scaling.status import EventKind, ScaleStatus

_FINAL = (ScalePhase.COMPLETED, ScalePhase.ROLLED_BACK, ScalePhase.FAILED)


class ScaleConflict(ElasticEPError):
    """A scale or rebalance request arrived while another one (or a recovery) was running."""


class ElasticCoordinator(FailureMonitor):
    """Launch, scale and watch one elastic job.

    Args:
        launcher: starts rank processes (``LocalProcessLauncher`` or ``RayLauncher``).
        limits: world sizes the model can run at (checked before anything changes).
        host / port: where the job's TCPStore listens (loopback and a free port by default).
        config: the engine's picklable settings, passed to every rank in its ``RankSpec``.
        timeout_s: group timeout given to the ranks.
        poll_interval_s: how often the monitor thread looks at processes and reports.
        leave_timeout_s: how long a leaver may take to exit after its commit.
    """

    def __init__(
        self,
        launcher: Launcher,
        limits: ScaleLimits,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        config: object = None,
        timeout_s: float = 30.0,
        poll_interval_s: float = 0.02,
        leave_timeout_s: float = 30.0,
    ) -> None:
        if not isinstance(limits, ScaleLimits):
            raise TypeError(f"limits must be ScaleLimits, got {type(limits).__name__}")
        self.limits = limits
        self._launcher = launcher
        self._config = config
        self._timeout_s = timeout_s
        self._poll_s = poll_interval_s
        self._leave_timeout_s = leave_timeout_s
        self._rdzv = Rendezvous(host, port or 0, is_master=True, timeout_s=timeout_s)
        self._channel = ControlChannel(self._rdzv.store, timeout_s)
        self._lock = threading.RLock()
        self._handles: dict[int, RankHandle] = {}
        self._next_member = 0
        self._status = ScaleStatus(ScalePhase.IDLE, epoch=-1, members=())
        self._driver: threading.Thread | None = None
        self._done = threading.Event()
        self._done.set()
        self._recoveries_seen = 0
        self._recovering_since: float | None = None
        self._running: Command | None = None  # the scale or rebalance in flight
        self._recovered: set[int] = set()  # recovery epochs already shown in the status
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="elastic-monitor", daemon=True)

    # ---- public API -------------------------------------------------------------------
    @property
    def store_address(self) -> tuple[str, int]:
        return self._rdzv.host, self._rdzv.port

    @property
    def store(self) -> Store:
        """The job's TCPStore, for the engine's own keys (keep clear of the ``ctl/`` and
        ``group/`` prefixes)."""
        return self._rdzv.store

    def status(self) -> ScaleStatus:
        """The current :class:`ScaleStatus` (a consistent snapshot)."""
        with self._lock:
            return self._status

    def start(self, world_size: int, *, timeout_s: float = 60.0) -> ScaleStatus:
        """Launch ``world_size`` initial ranks and wait until all serve.

        Raises ``ValueError`` for a size the model cannot run at, ``ElasticEPError`` if the
        ranks do not come up within ``timeout_s`` (they are killed).
        """
        self.limits.check_world_size(world_size)
        if self._status.members:
            raise ScaleConflict("the job has already started")
        epoch = self._rdzv.next_epoch("world")
        members = self._new_member_ids(world_size)
        for m in members:
            self._launch(
                RankSpec(
                    *self.store_address,
                    m,
                    epoch,
                    members,
                    RankRole.INITIAL,
                    self._config,
                    self._timeout_s,
                    arrival_timeout_s=timeout_s,
                )
            )
        reports = self._wait_reports(epoch, members, timeout_s)
        missing = [m for m in members if m not in reports]
        if missing:
            exited = [m for m in members if not self._handles[m].is_alive()]
            for m in members:
                self._handles.pop(m).kill()
            why = f"members {exited} exited" if exited else f"not within {timeout_s:g} s"
            raise ElasticEPError(f"initial members {missing} did not start: {why}")
        self._channel.set_world(epoch, members)
        with self._lock:
            self._status = ScaleStatus(ScalePhase.IDLE, epoch, members)
        self._monitor.start()
        return self._status

    def submit(self, request: ScaleRequest | RebalanceRequest) -> ScaleStatus:
        """Validate ``request`` and start it in the background; return the status at start.

        A :class:`ScaleRequest` changes the members (event ``scale``); a
        :class:`RebalanceRequest` keeps them and re-plans the placement from the serving one for
        the engine's load, with the identity rank mapping (event ``rebalance``). Both build a
        fresh epoch, stage it while the old one serves, and commit or roll back on every rank.

        Raises ``ValueError``/``TypeError`` for a bad request (nothing changes) and
        :class:`ScaleConflict` while another scale, rebalance or a recovery runs.
        """
        if not isinstance(request, (ScaleRequest, RebalanceRequest)):
            raise TypeError(
                f"request must be a ScaleRequest or RebalanceRequest, got {type(request).__name__}"
            )
        with self._lock:
            status = self._status
            if not status.members:
                raise ScaleConflict(
                    "the job has not started"
                    if status.error is None
                    else f"no rank serves any more: {status.error}"
                )
            if status.phase.is_active:
                raise ScaleConflict(
                    f"a {status.event.value if status.event else 'scale'} is running "
                    f"(phase {status.phase.value}); retry when it ends"
                )
            if isinstance(request, ScaleRequest):
                request.check(self.limits)
                fresh = range(self._next_member, self._next_member + request.target_size)
                new_members = request.next_members(status.members, fresh)
                self._next_member = max([self._next_member, *[m + 1 for m in new_members]])
                kind, event = CommandKind.SCALE, EventKind.SCALE
            else:
                new_members = status.members
                kind, event = CommandKind.REBALANCE, EventKind.REBALANCE
            cmd = Command(
                seq=self._channel.next_seq(),
                kind=kind,
                epoch=self._rdzv.next_epoch("world"),
                old_members=status.members,
                new_members=new_members,
                mode=request.mode,
                timeout_s=request.timeout_s,
            )
            self._set_phase(
                ScalePhase.PREPARING,
                event=event,
                event_id=cmd.seq,
                error=None,
                phase_s=(),
                blocking_s=None,
                kv_budget_bytes=None,
                balance_before=None,
                balance_after=None,
                experts_moved=None,
            )
            self._done.clear()
            self._running = cmd
            self._driver = threading.Thread(target=self._drive, args=(cmd,), daemon=True)
            self._driver.start()
            return self._status

    def wait(self, timeout_s: float) -> ScaleStatus:
        """Wait (bounded) for the running scale to end; return the status."""
        self._done.wait(timeout_s)
        return self.status()

    def scale(self, request: ScaleRequest) -> ScaleStatus:
        """:meth:`submit` and wait for the end (bounded by the request's timeout plus margin)."""
        self.submit(request)
        return self.wait(request.timeout_s + self._leave_timeout_s + 10.0)

    def rebalance(self, request: RebalanceRequest | None = None) -> ScaleStatus:
        """:meth:`submit` a rebalance (default: drain mode, 60 s) and wait for the end (bounded).

        The status then reports ``event=rebalance``, the phase durations, ``blocking_s``,
        ``balance_before``/``balance_after`` and ``experts_moved``.
        """
        request = RebalanceRequest() if request is None else request
        self.submit(request)
        return self.wait(request.timeout_s + self._timeout_s + 10.0)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Tell every rank to stop, wait (bounded) for the processes, kill the rest, close."""
        self._stop.set()
        self._channel.publish(Command(self._channel.next_seq(), CommandKind.STOP))
        deadline = time.monotonic() + timeout_s
        for handle in list(self._handles.values()):
            if not handle.join(max(0.0, deadline - time.monotonic())):
                handle.kill()
        if self._monitor.is_alive():
            self._monitor.join(timeout=5)
        self._handles.clear()
        self._rdzv.close()

    def handle(self, member: int) -> RankHandle:
        """The launched process of ``member`` (e.g. to kill it in a test)."""
        return self._handles[member]

    # ---- the scale driver --------------------------------------------------------------
    def _drive(self, cmd: Command) -> None:
        try:
            self._channel.publish(cmd)
            for m in cmd.joiners:
                self._launch(
                    RankSpec(
                        *self.store_address,
                        m,
                        cmd.epoch,
                        cmd.new_members,
                        RankRole.JOINER,
                        self._config,
                        self._timeout_s,
                    )
                )
            self._follow(cmd)
        except Exception as exc:  # the driver must always end the event
            self._channel.abort(cmd.seq)
            self._end_failed(cmd, f"coordinator error: {exc!r}")
        finally:
            self._running = None
            self._done.set()

    def _follow(self, cmd: Command) -> None:
        deadline = time.monotonic() + cmd.timeout_s + self._timeout_s + 5.0
        collector = self._channel.collector(cmd.epoch, cmd.old_members[0])
        aborted = False
        while time.monotonic() < deadline:
            if self._status.event is EventKind.RECOVERY:
                # A member died: the scale is marked failed and the ranks recover. The joiners
                # stay: if the ranks committed they are members; if not, they exit on their own
                # (and the recovery's end reaps any process that is not a member).
                self._channel.abort(cmd.seq)
                return
            reports = collector.poll()
            leader = reports.get(cmd.old_members[0])
            if (
                leader is not None
                and leader.phase.is_active
                and leader.phase is not self._status.phase
            ):
                self._advance(leader.phase)
            failed = [
                r
                for r in reports.values()
                if r.phase in (ScalePhase.ROLLED_BACK, ScalePhase.FAILED)
            ]
            old_final = [reports.get(m) for m in cmd.old_members]
            if failed and all(r is not None and r.phase in _FINAL for r in old_final):
                self._end_rolled_back(cmd, failed)
                return
            # The new members' reports decide: a leaver that hangs (or split off at the commit
            # vote and rolled back alone) must not hold the new world's status back.
            if all(
                m in reports and reports[m].phase is ScalePhase.COMPLETED for m in cmd.new_members
            ):
                self._end_completed(cmd, reports)
                return
            dead = [m for m in cmd.joiners if not self._handles[m].is_alive()]
            if dead and not aborted:
                self._channel.abort(cmd.seq)  # the ranks roll back at their next poll
                aborted = True
            time.sleep(self._poll_s)
        self._channel.abort(cmd.seq)
        self._end_failed(cmd, f"no final report within {cmd.timeout_s:g} s plus margins")

    def _advance(self, phase: ScalePhase) -> None:
        with self._lock:
            current = self._status.phase
            # Walk through skipped phases so the state machine stays explicit.
            order = [
                ScalePhase.PREPARING,
                ScalePhase.SYNCING_KV,
                ScalePhase.REBALANCING,
                ScalePhase.COMMITTING,
            ]
            if current in order and phase in order:
                for step in order[order.index(current) + 1 : order.index(phase) + 1]:
                    self._set_phase(step)

    def _end_completed(self, cmd: Command, reports: dict[int, RankReport]) -> None:
        leader = reports[cmd.new_members[0]]
        blocking = [r.blocking_s for r in reports.values() if r.blocking_s is not None]
        with self._lock:
            self._advance(ScalePhase.COMMITTING)
            self._set_phase(
                ScalePhase.COMPLETED,
                epoch=cmd.epoch,
                members=cmd.new_members,
                phase_s=reports.get(cmd.old_members[0], leader).phase_s,
                blocking_s=max(blocking, default=None),
                kv_budget_bytes=leader.kv_budget_bytes,
                balance_before=leader.balance_before,
                balance_after=leader.balance_after,
                experts_moved=leader.experts_moved,
            )
        for m in cmd.leavers:  # not members any more: a leaver that does not exit is killed
            handle = self._handles.pop(m)
            if not handle.join(self._leave_timeout_s):
                handle.kill()

    def _end_rolled_back(self, cmd: Command, failed: list[RankReport]) -> None:
        self._kill_joiners(cmd)
        errors = sorted({r.error for r in failed if r.error})
        with self._lock:
            self._set_phase(ScalePhase.FAILED, error="; ".join(errors) or "rolled back")
            self._set_phase(ScalePhase.ROLLED_BACK)

    def _end_failed(self, cmd: Command, reason: str) -> None:
        everyone = tuple(dict.fromkeys(cmd.old_members + cmd.new_members))
        reports = self._channel.reports(cmd.epoch, everyone).values()
        if not any(r.phase is ScalePhase.COMPLETED for r in reports):
            self._kill_joiners(cmd)  # nobody committed: the joiners are not members
        with self._lock:
            event = self._status.event
            if self._status.phase.is_active and event is not None and event.is_requested:
                self._set_phase(ScalePhase.FAILED, error=reason)

    def _kill_joiners(self, cmd: Command) -> None:
        for m in cmd.joiners:
            handle = self._handles.pop(m, None)
            if handle is not None and not handle.join(1.0):
                handle.kill()

    # ---- helpers --------------------------------------------------------------------------
    def _set_phase(self, phase: ScalePhase, **changes: object) -> None:
        with self._lock:
            check_transition(self._status.phase, phase)
            self._status = replace(self._status, phase=phase, **changes)  # type: ignore[arg-type]

    def _new_member_ids(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self._next_member, self._next_member + n))
        self._next_member += n
        return ids

    def _launch(self, spec: RankSpec) -> None:
        self._handles[spec.member_id] = self._launcher.launch(spec)

    def _wait_reports(
        self, epoch: int, members: tuple[int, ...], timeout_s: float
    ) -> dict[int, RankReport]:
        deadline = time.monotonic() + timeout_s
        reports: dict[int, RankReport] = {}
        collector = self._channel.collector(epoch, members[0])
        while time.monotonic() < deadline and len(reports) < len(members):
            reports = collector.poll()
            if any(not self._handles[m].is_alive() for m in members):
                break
            time.sleep(self._poll_s)
        return reports
