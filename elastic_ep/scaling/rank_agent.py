"""ElasticRank: the per-rank object an engine drives from its serving loop.

The engine calls :meth:`ElasticRank.poll` at a safe point between forward steps. Each poll acts
on a vote every rank agrees on (the newest command rank 0 saw in the store, "still busy",
"failed", "not waiting to transfer", "aborted"), so every rank acts on the same request at the
same step. By default the vote is pipelined: posted at one poll to a voter thread, read at the
next (:mod:`elastic_ep.scaling.poll`, which also keeps the blocking vote); how a rank learns of
a dead peer is in :mod:`elastic_ep.scaling.deaths`, a running scale's state in
:mod:`elastic_ep.scaling.scale_job`, the staging in :mod:`elastic_ep.scaling.transition`, and
what a rank does at each step of a scale, a join and a recovery in
:mod:`elastic_ep.scaling.rank_transitions` (a base class of ``ElasticRank``).

A scale, or a rebalance (same members, a new placement for the engine's load), stages the next
epoch on a background thread (see :mod:`elastic_ep.scaling.transition`) while the engine keeps
serving; once every rank is ready (and drained, in ``DRAIN`` mode) the same poll on every rank
commits. Where the transfer runs depends on ``transfer_in_poll``: on NCCL by default the
background thread only builds the groups (no GPU work) and the KV sync, the plan and the weight
transfer run at the first poll where every rank has its groups, so no two threads ever launch
NCCL collectives at once; that poll and the commit poll are the blocking part. On gloo (or with
``transfer_in_poll=False`` on CUDA, on a CUDA stream of its own) the background thread does it
all and only the commit poll blocks. A ``PeerFailure`` of the poll's collective (or one the
engine hands to :meth:`ElasticRank.recover`) starts a recovery with the survivors.

Typical loop::

    agent = ElasticRank(spec, weights=w, load=record.load, placement=p0, kv_bytes=free_kv)
    while True:
        action = agent.poll()
        if action in (Action.LEAVE, Action.STOP):
            break
        engine.step(agent.world)          # forward on the current epoch's group
    agent.close()
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import torch
from torch.distributed import Work

from elastic_ep.eplb import row_copy
from elastic_ep.eplb.buffers import PlacementBuffers
from elastic_ep.eplb.executor import DEFAULT_BUFFER_BYTES, ExecutionStats, ReloadHook
from elastic_ep.eplb.placement import Placement
from elastic_ep.errors import PeerFailure
from elastic_ep.groups import GroupClosedError, Rendezvous, StatelessGroup
from elastic_ep.scaling.channel import ControlChannel, RankReport
from elastic_ep.scaling.deaths import DeadWatch, DeathWatcher, wait_watching, watch_world
from elastic_ep.scaling.gate import GateMode, TrafficGate
from elastic_ep.scaling.launcher import RankRole, RankSpec
from elastic_ep.scaling.phase import ScalePhase
from elastic_ep.scaling.poll import IDLE, PollMode, Vote, Voter, blocking_vote
from elastic_ep.scaling.rank_transitions import EpochTransitions
from elastic_ep.scaling.resources import EpochContext, EpochResources, ResourceError, ResourceSet
from elastic_ep.scaling.scale_job import Action, ScaleJob, destroy_all
from elastic_ep.scaling.transition import (
    PlanFn,
    StageInputs,
    Weights,
    control_group,
    default_planner,
)

_NO_POST = (Action.LEAVE, Action.STOP, Action.RECOVERED)
"""Actions after which a poll posts no vote: the rank is done, or (a recovery) the new epoch's
first poll posts, wherever each survivor noticed the failure."""


class ElasticRank(EpochTransitions):
    """One rank of an elastic MoE engine.

    Args:
        spec: from the launcher (store address, member id, epoch, role).
        weights: ``weights[layer][kind]``: tensor ``[slots_per_rank, ...]`` of this rank's
            expert slots (any dtype, contiguous). Rewritten in place at commits (addresses
            stay); a joiner passes uninitialized tensors.
        load: ``() -> [L, E]`` non-negative expert load (e.g. the load record's window, summed
            over ranks). Called on a background thread of the planning rank.
        placement: the initial placement (identical on every initial rank); ``None`` on a joiner.
        kv_bytes: ``() -> int`` this rank's free KV-cache bytes; ``None`` on a joiner.
        reload: ``reload(layer, expert) -> tensors`` for experts whose every replica died.
        resources: epoch-bound resources, rebuilt at every commit.
        gate: the engine's traffic gate (closed while a scale runs).
        buffers: fixed-address routing tables, rewritten at every commit.
        planner: the placement planner (default ``elastic_ep.eplb.plan``).
        backend / device: of the process groups (``"gloo"`` CPU, ``"nccl"`` CUDA).
        timeout_s: bound on every group operation (and the build of a group).
        buffer_bytes: the weight executor's staging budget.
        recovery_window_s: how long survivors wait for each other after a failure (unless
            every member has arrived or was seen dead by the coordinator); default
            ``timeout_s + 1``, since a survivor that is not a neighbour of the dead rank may
            only notice at the timeout.
        watch_dead_s: for a world group other than the control group (NCCL), how often a
            watcher thread looks for members the coordinator marked dead (``ctl/dead/<member>``);
            on one it aborts the world group, so the engine's collectives blocked on the dead rank
            fail at once instead of at the timeout (an NCCL abort ends blocked kernels; a gloo
            abort does not unblock a waiting operation, so a gloo world gets no watcher).
            ``None``: no watcher.
        transfer_in_poll: run the KV sync, the plan and the weight transfer of a scale on the
            serving thread, at one poll every rank reaches at the same step, instead of on the
            background thread (which then only builds the groups; no GPU work). That poll counts
            as blocking time. Default (``None``): on for NCCL, off for gloo. ``False`` on NCCL
            overlaps the transfer with serving (the staging thread on a CUDA stream of its own:
            measured blocking ~1 ms instead of 0.2-0.3 s on 2x H200) but two threads then
            launch collectives of two NCCL communicators at once, which NCCL does not promise to
            make progress on; one GPU run of that mode hung unexplained (docs/scaling.md).

    Attributes:
        world: the serving epoch's world group (the engine runs its collectives on it).
        control: the serving epoch's gloo group that ``poll`` uses.
        members / placement / kv_budget_bytes / last_blocking_s: the serving epoch's state.
        last_transfer_s: of ``last_blocking_s``, the transfer poll's part (0.0 when the last
            scale transferred on the background thread).
        last_execution: the executor's statistics of the last committed scale or rebalance
            (``None`` before one): bytes, time per phase.

    Raises:
        ReconfigureError: on a joiner, when the scale it was launched for rolled back.
    """

    def __init__(
        self,
        spec: RankSpec,
        *,
        weights: Weights,
        load: Callable[[], torch.Tensor],
        placement: Placement | None = None,
        kv_bytes: Callable[[], int] | None = None,
        reload: ReloadHook | None = None,
        resources: EpochResources | None = None,
        gate: TrafficGate | None = None,
        buffers: PlacementBuffers | None = None,
        planner: PlanFn = default_planner,
        backend: str = "gloo",
        device: torch.device | str | None = None,
        timeout_s: float = 30.0,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        recovery_window_s: float | None = None,
        watch_dead_s: float | None = 0.01,
        transfer_in_poll: bool | None = None,
        poll_mode: PollMode = PollMode.PIPELINED,
    ) -> None:
        if (placement is None) != (spec.role is RankRole.JOINER):
            raise ValueError("an initial rank needs the initial placement; a joiner must pass None")
        if not isinstance(poll_mode, PollMode):
            raise TypeError(f"poll_mode must be a PollMode, got {poll_mode!r}")
        self.member = spec.member_id
        self.weights = weights
        self._poll_mode = poll_mode
        self._voter: Voter | None = None
        self._vote_channel: ControlChannel | None = None
        self._pending = 0  # the number of the vote posted and not read yet (0: none)
        self.gate = gate or TrafficGate()
        self.resources = resources or EpochResources()
        self._load = load
        self._kv_bytes = kv_bytes
        self._reload = reload
        self._buffers = buffers
        self._planner = planner
        self._backend = backend
        if device is None and backend == "nccl":
            # the CUDA current device is per thread: pin this one for the staging thread
            device = torch.device("cuda", torch.cuda.current_device())
        self._device = device
        self._timeout_s = timeout_s
        self._buffer_bytes = buffer_bytes
        self._transfer_in_poll = (
            backend == "nccl" if transfer_in_poll is None else bool(transfer_in_poll)
        )
        self._recovery_window_s = (
            timeout_s + 1.0 if recovery_window_s is None else recovery_window_s
        )
        self._rdzv = Rendezvous(
            spec.store_host, spec.store_port, is_master=False, timeout_s=timeout_s
        )
        self._channel = ControlChannel(self._rdzv.store, timeout_s)
        self._deaths = DeathWatcher(self._rdzv.client(timeout_s))
        self._job: ScaleJob | None = None
        self._retiring: list[threading.Thread] = []
        self._stop_watch = threading.Event()
        self.kv_budget_bytes: int | None = None
        self.last_blocking_s: float | None = None
        self.last_transfer_s = 0.0
        self.last_execution: ExecutionStats | None = None
        # A joiner's constructor is its commit: its first poll() only reports it, so its next
        # collective is the same forward step the existing ranks run after their commit poll.
        self._first_action: Action | None = (
            Action.COMMITTED if spec.role is RankRole.JOINER else None
        )
        # The executor's Triton kernel compiles (or loads) at its first launch in a process: an
        # initial rank does it before it serves, a joiner (whose own join does not use it) in
        # the background, for its later events.
        if spec.role is RankRole.JOINER:
            if device is not None:
                threading.Thread(
                    target=row_copy.ensure_warm, args=(device,), name="elastic-warm-up", daemon=True
                ).start()
            self._join(spec)
        else:
            if device is not None:
                row_copy.ensure_warm(device)
            assert placement is not None
            self._seen_seq = self._channel.latest_seq()
            self.placement = placement
            world = StatelessGroup(
                self._rdzv,
                "world",
                spec.epoch,
                spec.rank,
                len(spec.members),
                backend,
                device,
                timeout_s,
            )
            self._serve(world, control_group(self._rdzv, world), spec.members)
            self._install(self.resources.build(self._context(self.world, placement)), placement)
            self._report(ScalePhase.COMPLETED, spec.epoch)
        self._watcher: threading.Thread | None = None
        if watch_dead_s is not None and self.world is not self.control:
            self._watcher = threading.Thread(
                target=watch_world,
                args=(self._deaths, lambda: self._serving, self._stop_watch, watch_dead_s),
                name="elastic-watch",
                daemon=True,
            )
            self._watcher.start()

    # ---- state ----------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.world.epoch

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    # ---- the safe point ------------------------------------------------------------------
    def poll(self) -> Action:
        """Act on scale requests and failures; call between forward steps on every rank.

        ``PIPELINED`` (default): acts on the vote the previous poll posted and posts the next;
        the first poll of an epoch (after the start, a commit or a recovery) only posts and
        returns ``SERVE``. While a scale runs it votes within the call as ``BLOCKING`` does, until
        the scale ends, so the scale's lockstep decisions cost no extra step.
        ``BLOCKING``: votes and acts within the call, always.
        """
        voter = self._voter
        if voter is not None and self._job is None:
            # the serving path of a quiet step: one tuple read, one compare, one post
            n, agreed, _ = voter.finished
            if n == self._pending and agreed is not None and agreed.seq <= self._seen_seq:
                self._pending = voter.post(IDLE, 0)
                return Action.SERVE
        if self._first_action is not None:
            action, self._first_action = self._first_action, None
            self._post_vote()
            return action
        if self._poll_mode is PollMode.BLOCKING:
            return self._vote_now()
        pending, self._pending = self._pending, 0
        if pending:
            action = self._read_vote(pending)
            if action is not Action.SERVE or self._job is None:
                if action not in _NO_POST:
                    self._post_vote()
                return action
        elif self._job is None:  # the first poll of this epoch: nothing to read yet
            self._post_vote()
            return Action.SERVE
        # A scale runs: vote within the poll, as the blocking poll does, so each of its lockstep
        # decisions costs no extra step. Every rank is in a job at the same votes (a job starts
        # and ends on an agreed vote), so every rank votes here at the same polls.
        action = self._vote_now()
        if action not in _NO_POST and self._job is None:
            self._post_vote()  # the scale ended: back to the pipelined vote
        return action

    def _vote_now(self) -> Action:
        """Vote on the serving thread (gloo's all-reduce; the leader reads the store) and act."""
        flags = self._flags(read_store=True).to_tensor()
        try:
            blocking_vote(self.control, flags, self._dead_watch)
        except (PeerFailure, GroupClosedError) as failure:
            return self.recover(failure)
        return self._act(Vote.from_tensor(flags))

    def _read_vote(self, n: int) -> Action:
        """Wait for vote ``n`` of this epoch's voter and act on it (recover on a failure)."""
        assert self._voter is not None
        try:
            vote = self._voter.result(n, self._dead_watch)
        except (PeerFailure, GroupClosedError) as failure:
            return self.recover(failure)
        return self._act(vote)

    def _flags(self, *, read_store: bool) -> Vote:
        """This rank's side of the vote; the leader reads the store only when ``read_store``
        (in ``PIPELINED`` mode its voter thread does)."""
        job = self._job
        leader_reads = read_store and self.world.rank == 0
        seq = self._channel.read_or(self._channel.latest_seq, self._seen_seq) if leader_reads else 0
        # not_waiting False = this rank's groups are built and wait for the transfer poll
        if job is None:
            return IDLE if seq == 0 else Vote(seq=seq)
        now = time.monotonic()
        draining = (
            job.command.mode is GateMode.DRAIN
            and self.gate.in_flight > 0
            and now < job.drain_deadline
        )
        timed_out = not job.done and now > job.deadline
        if timed_out and job.error is None:
            job.error = f"the scale did not finish within {job.command.timeout_s:g} s"
        return Vote(
            seq=seq,
            busy=not job.done or draining,
            failed=job.error is not None or timed_out,
            not_waiting=job.groups is None or job.done,
            aborted=leader_reads
            and self._channel.read_or(lambda: self._channel.aborted(job.command.seq), False),
        )

    def _act(self, vote: Vote) -> Action:
        """What every rank does for the same agreed ``vote``."""
        job = self._job
        if job is None:
            return self._maybe_start(vote.seq)
        if vote.aborted and job.error is None:
            job.error = "the coordinator aborted the scale (a joiner died or never arrived)"
        if vote.failed or vote.aborted:
            self._rollback(job.error or "another rank failed while staging the next epoch")
            return Action.ROLLED_BACK
        if vote.busy:
            if not vote.not_waiting:  # every rank has built its groups: transfer now, in lockstep
                self._transfer(job)
            return Action.SERVE
        return self._commit(job)

    def _post_vote(self) -> None:
        """``PIPELINED``: post this rank's flags for the next poll to read."""
        if self._poll_mode is not PollMode.PIPELINED:
            return
        if self._voter is None:
            if self._vote_channel is None:
                client = self._rdzv.client(self._timeout_s)
                self._vote_channel = ControlChannel(client, self._timeout_s)
            self._voter = Voter(self.control, self._vote_channel)
        job = self._job
        self._pending = self._voter.post(
            self._flags(read_store=False), 0 if job is None else job.command.seq
        )

    def _drop_votes(self) -> None:
        """End this epoch's voting (a vote stuck on a dead peer ends at the group timeout)."""
        self._pending = 0
        if self._voter is not None:
            self._voter.close()
            self._voter = None

    def wait(self, work: Work, group: StatelessGroup) -> None:
        """Wait for ``work``, an async operation on ``group`` (an epoch group of this agent).

        Unlike a blocking wait, fails within ~20 ms with ``PeerFailure`` once the coordinator
        marks a member of the serving epoch dead (``ctl/dead/<member>``): only the dead rank's
        neighbours see the broken connection, the others would wait for the group timeout, and
        a gloo abort does not wake a blocked wait. The engine may wait for its own gloo
        collectives this way (``work = group.process_group.allreduce(...)``). On CUDA, ``work``
        completes when the kernel is enqueued, as with ``work.wait()``.
        """
        wait_watching(work, group, self._dead_watch)

    def _retire(self, groups: list[StatelessGroup], *, wait: bool) -> None:
        """Destroy the previous epoch's groups off the serving path (their teardown waits on
        peers); ``close`` joins the thread, bounded."""
        thread = threading.Thread(
            target=destroy_all, args=(groups,), name="elastic-retire", daemon=True
        )
        thread.start()
        self._retiring.append(thread)
        if wait:
            thread.join(timeout=self._timeout_s)

    # ---- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Tear down resources and groups (idempotent); call after LEAVE or STOP."""
        self._stop_watch.set()
        self._deaths.stop()
        self._drop_votes()
        if self._watcher is not None:
            self._watcher.join(timeout=self._timeout_s)
        if self._job is not None:
            self._job.registry.abort_all()
            self._job = None
        current = self.resources.current
        if current is not None:
            # the process is leaving; nothing depends on these any more
            with contextlib.suppress(ResourceError):
                current.teardown()
        self.control.destroy()
        self.world.destroy()
        for thread in self._retiring:
            thread.join(timeout=self._timeout_s)
        self._rdzv.close()

    # ---- helpers ----------------------------------------------------------------------------
    def _serve(
        self, world: StatelessGroup, control: StatelessGroup, members: tuple[int, ...]
    ) -> None:
        self._drop_votes()  # votes belong to one epoch's control group
        self.world, self.control, self.members = world, control, members
        self._dead_watch = DeadWatch(self._deaths, members)
        self._serving = (members, world)  # one assignment: the watcher reads a consistent pair

    def _inputs(self, previous: Placement | None, *, with_kv: bool = True) -> StageInputs:
        """This rank's staging inputs; the KV callback is asked only when ``with_kv``."""
        kv_bytes = self._kv_bytes if with_kv and previous is not None else None
        return StageInputs(
            member=self.member,
            previous=previous,
            weights=self.weights,
            load=self._load,
            kv_bytes=None if kv_bytes is None else kv_bytes(),
            planner=self._planner,
            reload=self._reload,
            buffer_bytes=self._buffer_bytes,
            backend=self._backend,
            device=self._device,
            timeout_s=self._timeout_s,
            # A joiner only receives, which the multi-tensor copies do as fast as the Triton
            # kernel (bench_executor "up"), and a fresh process would first compile or load
            # the kernel (1.6 s on H200 with an empty cache).
            copy="torch" if previous is None else "auto",
        )

    def _context(self, group: StatelessGroup, placement: Placement) -> EpochContext:
        return EpochContext(
            epoch=group.epoch,
            rank=group.rank,
            world_size=group.world_size,
            groups=group,
            placement=placement,
            rendezvous=self._rdzv,
        )

    def _install(self, new_set: ResourceSet, placement: Placement) -> str | None:
        """Swap in ``new_set`` and the placement; return the old set's teardown error, if any."""
        if self._buffers is not None:
            self._buffers.update_(placement)
        previous = self.resources.install(new_set)
        if previous is None:
            return None
        try:
            previous.teardown()
        except ResourceError as exc:
            return str(exc)
        return None

    def _enter(self, job: ScaleJob, phase: ScalePhase) -> None:
        job.clock.enter(phase)
        if self.world.rank == 0:
            self._report(phase, job.command.epoch)

    def _finish(self, job: ScaleJob, phase: ScalePhase, error: str | None) -> None:
        done = job.staged if phase is ScalePhase.COMPLETED else None
        self._channel.report(
            RankReport(
                job.command.epoch,
                self.member,
                phase,
                job.clock.stop(),
                blocking_s=None if done is None else self.last_blocking_s,
                kv_budget_bytes=self.kv_budget_bytes,
                balance_before=None if done is None else done.balance[0],
                balance_after=None if done is None else done.balance[1],
                experts_moved=None if done is None else done.experts_moved,
                members=job.command.new_members,
                error=error,
            )
        )
        if (
            phase is ScalePhase.COMPLETED
            and self.world.rank == 0
            and self.member in job.command.new_members
        ):
            self._channel.set_world(job.command.epoch, job.command.new_members)

    def _report(self, phase: ScalePhase, epoch: int) -> None:
        self._channel.report(RankReport(epoch, self.member, phase, members=self.members))
