"""How a rank moves from one epoch to the next: a scale or rebalance, a joiner's join, a recovery.

Part of :class:`~elastic_ep.scaling.rank_agent.ElasticRank` (a base class of it: the methods
share the agent's state). Every step here starts from a vote every rank agreed on, so every rank
takes it at the same poll:

- **start** (:meth:`EpochTransitions._maybe_start`): a new command number in the vote: read the
  command, close the traffic gate, stage on a background thread (``_stage_in_background``):
  the next epoch's groups, and on gloo (or ``transfer_in_poll=False``) also the KV sync, the
  plan and the weights into staged copies;
- **transfer** (``_transfer``): on NCCL by default, the KV sync, plan and weight transfer run
  on the serving thread at the poll where every rank's groups are built;
- **commit** (``_commit``): every rank of the transfer group agrees (``_decide``: one MAX
  all-reduce of "my epoch resources failed"), then switches to the new groups, copies the
  staged weights in place, installs the new placement and resources, retires the old groups
  off the serving path; a leaver leaves. Otherwise ``_rollback``: the old epoch is untouched;
- **join** (``_join``): a joiner's constructor stages and commits the epoch it was launched for;
- **recovery** (:meth:`EpochTransitions.recover`): after a ``PeerFailure``, the survivors agree
  on who is left and rebuild (:mod:`elastic_ep.scaling.recovery`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed import ReduceOp

from elastic_ep.eplb.executor import ExecutionStats
from elastic_ep.eplb.placement import Placement
from elastic_ep.errors import ElasticEPError, PeerFailure, ReconfigureError
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.scaling.channel import CommandKind, ControlChannel, RankReport
from elastic_ep.scaling.deaths import DeathWatcher
from elastic_ep.scaling.gate import GateMode, TrafficGate
from elastic_ep.scaling.launcher import RankSpec
from elastic_ep.scaling.phase import ScalePhase
from elastic_ep.scaling.recovery import recover_world, report_failed_recovery
from elastic_ep.scaling.resources import EpochResources, ResourceError, ResourceSet
from elastic_ep.scaling.scale_job import Action, ScaleJob
from elastic_ep.scaling.status import PhaseClock
from elastic_ep.scaling.transition import (
    StagedEpoch,
    abort_in_background,
    build_next_groups,
    commit_weights,
    control_group,
    move_into_next,
    stage_next_epoch,
    staging_stream,
)


class EpochTransitions:
    """The epoch transitions of an :class:`~elastic_ep.scaling.rank_agent.ElasticRank`."""

    member: int
    members: tuple[int, ...]
    world: StatelessGroup
    control: StatelessGroup
    placement: Placement
    weights: Any
    gate: TrafficGate
    resources: EpochResources
    kv_budget_bytes: int | None
    last_blocking_s: float | None
    last_transfer_s: float
    last_execution: ExecutionStats | None
    _rdzv: Rendezvous
    _channel: ControlChannel
    _deaths: DeathWatcher
    _job: ScaleJob | None
    _seen_seq: int
    _transfer_in_poll: bool
    _device: torch.device | str | None
    _timeout_s: float
    _recovery_window_s: float
    _drop_votes: Callable[[], None]
    _serve: Callable[[StatelessGroup, StatelessGroup, tuple[int, ...]], None]
    _install: Callable[..., str | None]
    _inputs: Callable[..., Any]
    _context: Callable[..., Any]
    _enter: Callable[[ScaleJob, ScalePhase], None]
    _finish: Callable[[ScaleJob, ScalePhase, str | None], None]
    _retire: Callable[..., None]

    def _maybe_start(self, seq: int) -> Action:
        if seq <= self._seen_seq:
            return Action.SERVE
        self._seen_seq = seq
        cmd = self._channel.command(seq)
        if cmd.kind is CommandKind.STOP:
            return Action.STOP
        if cmd.old_members != self.members:
            return Action.SERVE  # made for another epoch (the world changed since): ignore it
        self.gate.close(cmd.mode, retry_after_s=cmd.timeout_s)
        now = time.monotonic()
        job = ScaleJob(cmd, PhaseClock(), now + cmd.timeout_s, now + cmd.timeout_s)
        job.thread = threading.Thread(
            target=self._stage_in_background,
            args=(job,),
            name=f"elastic-stage-{cmd.epoch}",
            daemon=True,
        )
        self._job = job
        job.thread.start()
        return Action.SERVE

    def _stage_in_background(self, job: ScaleJob) -> None:
        try:
            # the KV callback is asked where the KV sync runs: here, or at the transfer poll
            inputs = self._inputs(self.placement, with_kv=not self._transfer_in_poll)
            if self._transfer_in_poll:
                job.groups = build_next_groups(
                    self._rdzv,
                    job.command,
                    inputs,
                    job.registry,
                    lambda p: self._enter(job, p),
                    serving_world=self.world,  # the transfer runs at a poll of this thread
                )
            else:
                with staging_stream(self._device):
                    staged = stage_next_epoch(
                        self._rdzv, job.command, inputs, job.registry, lambda p: self._enter(job, p)
                    )
                job.staged = staged
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"

    def _transfer(self, job: ScaleJob) -> None:
        """KV sync, plan and weight transfer on the serving thread (every rank at this poll)."""
        assert job.groups is not None
        start = time.monotonic()
        try:
            job.staged = move_into_next(
                job.groups,
                job.command,
                self._inputs(self.placement),
                lambda p: self._enter(job, p),
            )
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
        job.transfer_s = time.monotonic() - start

    # ---- commit / rollback ---------------------------------------------------------------
    def _commit(self, job: ScaleJob) -> Action:
        start = time.monotonic()
        staged = job.staged
        assert staged is not None
        self._enter(job, ScalePhase.COMMITTING)
        new_set, error = self._build_next(staged)
        if not self._decide(staged, error is None):
            if new_set is not None:
                new_set.teardown()
            self._rollback(error or "another rank failed to build its epoch resources")
            return Action.ROLLED_BACK
        old_world, old_control = self.world, self.control
        groups = staged.groups
        leaving = groups.new_group is None
        if not leaving:
            assert groups.new_group is not None and groups.new_control is not None
            assert new_set is not None
            commit_weights(self.weights, staged)
            self._serve(groups.new_group, groups.new_control, staged.command.new_members)
            self._install(new_set, staged.placement)
            self.kv_budget_bytes = staged.kv_budget_bytes
        else:
            self.members = staged.command.new_members
        self.placement = staged.placement
        self._job = None
        self.last_blocking_s = time.monotonic() - start + job.transfer_s
        self.last_transfer_s = job.transfer_s
        self.last_execution = staged.transfer
        retired = [old_control, old_world]
        if groups.transfer_group not in (groups.new_group, old_world):
            retired.append(groups.transfer_group)
        self._retire(retired, wait=leaving)
        self._finish(job, ScalePhase.COMPLETED, None)
        self.gate.open()
        return Action.LEAVE if leaving else Action.COMMITTED

    def _build_next(self, staged: StagedEpoch) -> tuple[ResourceSet | None, str | None]:
        new_group = staged.groups.new_group
        if new_group is None:
            return None, None
        try:
            return self.resources.build(self._context(new_group, staged.placement)), None
        except ResourceError as exc:
            return None, str(exc)

    def _decide(self, staged: StagedEpoch, ok: bool) -> bool:
        """Commit only if every rank of the transfer group (old and new) is ready."""
        group = staged.groups.transfer_group
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=group.device)
        try:
            group.all_reduce(flag, ReduceOp.MAX, sync=True)  # read below: bounded wait
        except PeerFailure:
            return False
        return int(flag) == 0

    def _rollback(self, reason: str) -> None:
        job = self._job
        assert job is not None
        self._job = None
        job.registry.abort_all()  # the staging thread, if still running, ends on its own
        self._finish(job, ScalePhase.ROLLED_BACK, reason)
        self.gate.open()

    # ---- joiners --------------------------------------------------------------------------
    def _join(self, spec: RankSpec) -> None:
        self._seen_seq = self._channel.latest_seq()
        cmd = self._channel.command(self._seen_seq)
        if cmd.epoch != spec.epoch or self.member not in cmd.new_members:
            raise ReconfigureError(f"member {self.member}: no scale command for epoch {spec.epoch}")
        now = time.monotonic()
        job = ScaleJob(cmd, PhaseClock(), now + cmd.timeout_s, now)
        self._job = job
        try:
            staged = stage_next_epoch(
                self._rdzv, cmd, self._inputs(None), job.registry, job.clock.enter
            )
            new_set, error = self._build_next(staged)
            if not self._decide(staged, error is None):
                raise ReconfigureError(error or "the scale was rolled back")
        except Exception as exc:
            job.registry.abort_all()
            self._finish(job, ScalePhase.ROLLED_BACK, f"{type(exc).__name__}: {exc}")
            self._deaths.stop()
            self._rdzv.close()
            raise ReconfigureError(
                f"joiner {self.member} could not join epoch {cmd.epoch}: {exc}"
            ) from exc
        groups = staged.groups
        assert groups.new_group is not None and groups.new_control is not None
        assert new_set is not None
        self._serve(groups.new_group, groups.new_control, cmd.new_members)
        self.placement = staged.placement
        self.kv_budget_bytes = staged.kv_budget_bytes
        self._install(new_set, staged.placement)
        self._job = None
        job.staged = staged
        self.last_execution = staged.transfer
        self._finish(job, ScalePhase.COMPLETED, None)

    # ---- recovery -------------------------------------------------------------------------
    def recover(self, failure: ElasticEPError) -> Action:
        """Shrink to the survivors after ``failure`` and resume (collective over survivors).

        Call it when the engine's own collective raised ``PeerFailure`` (or ``GroupClosedError``:
        on an NCCL world the watcher aborts the world group when a member is marked dead);
        ``poll`` calls it for its own. Then redo the forward step that failed: every survivor's
        next collective is then that forward step, wherever it saw the failure.

        Raises ``ReconfigureError`` if this rank is not a survivor or the recovery failed.
        """
        start = time.monotonic()
        clock = PhaseClock()
        clock.enter(ScalePhase.RECOVERING)
        self._drop_votes()
        # in the background: aborting waits for an operation still in flight on the dead rank
        abort_in_background([self.control, self.world])
        if self._job is not None:
            job, self._job = self._job, None
            job.registry.abort_all()
        self.gate.close(GateMode.REJECT, retry_after_s=self._recovery_window_s + self._timeout_s)
        survivors, got = recover_world(
            self._rdzv,
            self._channel,
            self.world.epoch,
            self.members,
            self._inputs(self.placement, with_kv=False),
            window_s=self._recovery_window_s,
            timeout_s=self._timeout_s,
        )
        try:
            control = control_group(self._rdzv, got.group)
            new_set = self.resources.build(self._context(got.group, got.placement))
        except (PeerFailure, ResourceError) as err:
            got.group.abort()
            report_failed_recovery(self._channel, survivors, self.member, str(err))
            raise ReconfigureError(f"recovery to epoch {survivors.epoch} failed: {err}") from err
        except BaseException:
            got.group.abort()
            raise
        self._serve(got.group, control, survivors.members)
        self.placement = got.placement
        teardown_error = self._install(new_set, got.placement)
        self.last_blocking_s = time.monotonic() - start
        self._channel.report(
            RankReport(
                survivors.epoch,
                self.member,
                ScalePhase.COMPLETED,
                clock.stop(),
                blocking_s=self.last_blocking_s,
                lost_experts=got.lost_experts,
                members=survivors.members,
                dead_members=survivors.dead,
                error=teardown_error,
            )
        )
        if self.world.rank == 0:
            self._channel.set_world(survivors.epoch, survivors.members)
            self._channel.add_recovery(survivors.epoch)
        self.gate.open()
        return Action.RECOVERED
