"""Run a :class:`TransferPlan`: rewrite every rank's expert weights in place.

Each rank passes the weights of its local slots: ``weights[layer]`` is a sequence of tensors (e.g.
``w13``, ``w2``, scales), each ``[local_slots, ...]`` and contiguous, on the group's device. All
ranks must pass the same number of tensors per layer, with the same per-slot shape and dtype.

How it stays in place within ``buffer_bytes`` of extra memory (one buffer, allocated once):

* per chunk, the rows this rank sends to a peer are packed into the buffer and leave as one
  transfer; the peer receives them into its buffer with the same layout, and writes them into
  their slots once the chunk's transfers are done. Local copies go slot to slot first (those
  whose source another local copy overwrites are staged in the buffer like receives);
* the plan's steps are packed into chunks whose buffer fits; the plan orders steps so a slot is
  read no later than the chunk that overwrites it, so chunk ``k``'s write-back never touches what a
  later chunk still sends;
* with ``overlap=True`` chunk ``k+1`` is packed and posted before chunk ``k`` is waited for and
  written back (chunks are then cut to half the budget, so two live chunks fit in it);
* chunks are laid out in growing batches just before they run (``exec_layout``: numpy over the
  plan's op table), and every copy is a row (source, destination, bytes); per chunk, packing,
  slot-to-slot copies and write-back are one launch each:
  a fused Triton kernel over the chunk's rows on CUDA, one batch on the copy engines with
  ``copy="engine"`` (no SMs taken), or one multi-tensor copy (``torch._foreach_copy_``)
  on CPU or with ``copy="torch"`` (an expert is a few large rows: per-row kernels are slow).
  On CUDA everything runs on a stream of its own, ordered after the caller's current stream.

Every rank computes the same chunks from the same plan, so peers post matching transfers in the
same order. A collective check (one small all-reduce) first verifies that all ranks run the same
plan with the same budget and weight shapes; any error found before that check, or by it, raises
on every rank with nothing moved.

The pieces: :mod:`~elastic_ep.eplb.exec_ranks` (where the plan's ranks sit in the group),
:mod:`~elastic_ep.eplb.exec_check` (argument checks and the plan check),
:mod:`~elastic_ep.eplb.exec_chunks` (chunk cuts), :mod:`~elastic_ep.eplb.exec_layout` (each
rank's rows and regions) and :mod:`~elastic_ep.eplb.exec_runner` (the launches, in stream order).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elastic_ep.eplb.copy_engine import engine_available
from elastic_ep.eplb.exec_check import PlanCheck, check_weights, kind_bytes, plan_digest
from elastic_ep.eplb.exec_chunks import cut_chunks, min_buffer_bytes
from elastic_ep.eplb.exec_layout import aligned
from elastic_ep.eplb.exec_ranks import GroupRanks, ProcessRanks
from elastic_ep.eplb.exec_runner import Phase, ReloadHook, Runner, Timer
from elastic_ep.eplb.row_copy import ensure_warm, triton_available
from elastic_ep.eplb.transfer_plan import TransferPlan
from elastic_ep.errors import ElasticEPError
from elastic_ep.groups.stateless_group import StatelessGroup

__all__ = [
    "COPY_PATHS",
    "DEFAULT_BUFFER_BYTES",
    "ExecutionStats",
    "GroupRanks",
    "LostExpertsError",
    "Phase",
    "PreparedExecution",
    "ReloadHook",
    "execute",
    "prepare_execution",
    "required_buffer_bytes",
]

DEFAULT_BUFFER_BYTES = 1 << 30
"""Default extra memory ``execute`` may use for staging: 1 GiB."""

COPY_PATHS = ("auto", "torch", "triton", "engine")
"""Values of ``execute``'s ``copy`` argument."""


class LostExpertsError(ElasticEPError):
    """Experts whose every replica was on a dead rank, and no ``reload`` hook was given.

    Attributes:
        experts: the ``(layer, expert)`` pairs that cannot be sent, ascending.
    """

    def __init__(self, message: str, *, experts: tuple[tuple[int, int], ...]):
        super().__init__(message)
        self.experts = experts


@dataclass(frozen=True)
class ExecutionStats:
    """What ``execute`` did on this rank.

    Attributes:
        group_rank: this rank in the group that ran the plan.
        bytes_sent / bytes_received: this rank's network bytes.
        bytes_sent_per_rank / bytes_received_per_rank: every group rank's (exact, from the plan).
        seconds: wall time per :class:`Phase` on this rank (on CUDA, ``execute`` waits for its
            device work at the end, so their sum bounds it; the split between phases is host
            time).
        total_seconds: wall time of the whole call.
        first_transfer_seconds: from the call to posting this rank's first transfer (host
            time): what it spent validating, checking the plan with its peers and laying out
            and packing the first chunk before any weight moved.
        num_chunks: chunks the plan was cut into.
        peak_extra_bytes: most buffer memory live at once on this rank.
        buffer_bytes: the budget it ran under.
        reloaded: ``(layer, expert)`` pairs this rank got from the ``reload`` hook.
    """

    group_rank: int
    bytes_sent: int
    bytes_received: int
    bytes_sent_per_rank: tuple[int, ...]
    bytes_received_per_rank: tuple[int, ...]
    seconds: tuple[tuple[Phase, float], ...]
    total_seconds: float
    first_transfer_seconds: float
    num_chunks: int
    peak_extra_bytes: int
    buffer_bytes: int
    reloaded: tuple[tuple[int, int], ...]

    def phase_seconds(self, phase: Phase) -> float:
        return dict(self.seconds)[phase]


def execute(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    group: StatelessGroup,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    dead_ranks: Iterable[int] = (),
    reload: ReloadHook | None = None,
    ranks: GroupRanks | None = None,
    overlap: bool = True,
    copy: str = "auto",
) -> ExecutionStats:
    """Move expert weights as ``plan`` says, in place, over ``group``. Collective: every group
    rank calls it with the same plan, budget and options.

    Args:
        plan: from :func:`plan_transfers` (identical on every rank).
        weights: ``weights[layer][kind]``: tensor ``[local_slots, ...]`` (any dtype, contiguous,
            on ``group.device``) with ``local_slots`` >= the slots this rank has in ``previous``
            (if it is an old rank) and in ``new`` (if it is a new rank). A joiner passes
            uninitialized tensors; a leaver passes its current ones. Slots that are empty (-1) in
            the new placement, or beyond it, are left untouched.
        group: the group that runs the transfer (see ``ranks``).
        buffer_bytes: most extra memory this rank may use for staging.
        dead_ranks: old ranks that died (besides ``plan.dead_ranks``); they send nothing. If any
            is new to the plan, the plan is recomputed with them (the same on every rank).
        reload: called as ``reload(layer, expert)`` on the receiving rank for each expert whose
            every replica was on a dead rank; returns one tensor per kind shaped like one slot,
            on the CPU (pinned saves a copy) or the group's device. It runs when its chunk is
            written back, beside the transfers; the upload does not wait for them on the host.
        ranks: group rank of each old and new rank; default
            ``GroupRanks.for_world_size(plan.rank_mapping, group.world_size)``.
        overlap: post the next chunk's transfers before writing back the current one.
        copy: how rows are packed and written back: ``"triton"`` (one fused kernel launch per
            chunk and direction, CUDA only), ``"engine"`` (one batch of copy-engine copies per
            chunk and direction, CUDA >= 12.8 only), ``"torch"`` (multi-tensor copies), or
            ``"auto"`` (Triton on CUDA when it is installed, else torch). Bit-exact either way.
    Returns:
        this rank's :class:`ExecutionStats`.
    Raises:
        TypeError/ValueError: bad arguments (nothing moved), e.g. a sender or receiver not in the
            group, weights too small, ``buffer_bytes`` below what one step needs.
        LostExpertsError: experts must be reloaded but ``reload`` is None (nothing moved).
        PeerFailure: a peer died during the transfer (weights partly moved), seen within the
            group's ``timeout_s``; on NCCL the group is then aborted.

    The host work (validation, chunking, layout) runs first, chunks laid out in growing batches
    while earlier ones transfer; :func:`prepare_execution` does all of it ahead of time instead.
    """
    started = time.perf_counter()
    prepared = _prepare(
        plan, weights, group, buffer_bytes, dead_ranks, reload, ranks, overlap, copy, started
    )
    return prepared._run(started, lay_out_ahead=False)


def prepare_execution(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    group: StatelessGroup,
    *,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    dead_ranks: Iterable[int] = (),
    reload: ReloadHook | None = None,
    ranks: GroupRanks | None = None,
    overlap: bool = True,
    copy: str = "auto",
) -> PreparedExecution:
    """All of :func:`execute`'s host work, ahead of time: validation, chunking, the layout of
    every chunk and its copy launches. No communication; weights are not touched. Arguments and
    errors as for :func:`execute`.

    Run it later with :meth:`PreparedExecution.run` (collective), e.g. prepare while the engine
    still serves and run when it pauses: the run then spends its time moving data (on 4x H200 a
    10% drift of DeepSeek-V2-Lite posts its first transfer 0.3-0.4 ms after the call instead of
    1.9-3.5 ms, and takes 4.6-5.1 ms instead of 7.2-8.5 ms); :meth:`PreparedExecution.check`
    (collective) can also verify the peers ahead, which takes the plan check off the run's
    start. Until it runs, the
    prepared execution holds the staging buffer (``buffer_bytes`` at most) and the addresses of
    ``weights``: the same tensors must be passed to nothing else that reallocates them.
    """
    started = time.perf_counter()
    prepared = _prepare(
        plan, weights, group, buffer_bytes, dead_ranks, reload, ranks, overlap, copy, started
    )
    prepared._lay_out_all()
    return prepared


def _prepare(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    group: StatelessGroup,
    buffer_bytes: int,
    dead_ranks: Iterable[int],
    reload: ReloadHook | None,
    ranks: GroupRanks | None,
    overlap: bool,
    copy: str,
    started: float,
) -> PreparedExecution:
    """Validate the arguments and cut the chunks (no layout yet, no device work)."""
    timer = Timer()
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be a TransferPlan, got {type(plan).__name__}")
    if not isinstance(group, StatelessGroup):
        raise TypeError(f"group must be a StatelessGroup, got {type(group).__name__}")
    if copy not in COPY_PATHS:
        raise ValueError(f"copy must be one of {COPY_PATHS}, got {copy!r}")
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 0:
        raise ValueError(f"buffer_bytes must be a non-negative int, got {buffer_bytes!r}")
    dead = set(plan.dead_ranks) | set(dead_ranks)
    if dead != set(plan.dead_ranks):
        plan = plan.replan(dead)
    timer.add(Phase.PLAN, started)
    process = ProcessRanks.resolve(plan, group, ranks)
    kinds = check_weights(plan, weights, process, group.device)
    if plan.reloads and reload is None:
        lost = tuple(sorted({(r.layer, r.expert) for r in plan.reloads}))
        raise LostExpertsError(
            f"{len(lost)} (layer, expert) pairs had every replica on dead ranks "
            f"{list(plan.dead_ranks)} and no reload hook was given: {list(lost)}",
            experts=lost,
        )
    slot_kind_bytes = kind_bytes(weights)
    row_bytes = [sum(aligned(b) for b in layer) for layer in slot_kind_bytes]
    chunks = cut_chunks(plan, row_bytes, process.ranks, buffer_bytes, overlap)
    copy_path = _copy_path(copy, group.device)
    if copy_path in ("triton", "torch"):
        ensure_warm(group.device, copy_path)  # not at a first launch mid-run: see ensure_warm
    runner = Runner(
        plan,
        weights,
        group,
        process,
        chunks,
        slot_kind_bytes,
        reload,
        timer,
        copy_path,
    )
    digest = plan_digest(plan, buffer_bytes, overlap, kinds, process)
    return PreparedExecution(plan, group, process, runner, digest, buffer_bytes, overlap)


class PreparedExecution:
    """One rank's part of a plan's execution, prepared by :func:`prepare_execution`; run it
    once."""

    def __init__(
        self,
        plan: TransferPlan,
        group: StatelessGroup,
        process: ProcessRanks,
        runner: Runner,
        digest: int,
        buffer_bytes: int,
        overlap: bool,
    ) -> None:
        self.plan, self.group, self._process, self._digest = plan, group, process, digest
        self.buffer_bytes, self._overlap = buffer_bytes, overlap
        self._runner: Runner | None = runner
        # Made by _lay_out_all when prepared ahead, else by the run (the byte counts after it).
        self._check: PlanCheck | None = None
        self._bytes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def run(self) -> ExecutionStats:
        """Move the weights (collective: every group rank runs its prepared execution of the
        same plan). Returns and raises as :func:`execute`; ``first_transfer_seconds`` and
        ``total_seconds`` count from this call, the ``plan`` phase includes the preparation.

        Raises:
            RuntimeError: it already ran.
        """
        return self._run(time.perf_counter(), lay_out_ahead=True)

    def check(self) -> None:
        """Verify now that every group rank prepared the same plan, budget, options and weight
        shapes, instead of at the start of :meth:`run` (collective: every group rank calls it
        before its run; one small all-reduce). :meth:`run` then posts its first transfer without
        that round trip, e.g. an engine checks while it still serves and runs when it pauses.

        Raises:
            ValueError: the ranks prepared different executions (nothing moved; the group stays
                usable).
            PeerFailure: a peer failed, or did not call it within the group's timeout.
            RuntimeError: it already ran, or was checked.
        """
        check = self._check
        if self._runner is None or check is None:
            raise RuntimeError("this PreparedExecution already ran; prepare the next one")
        if check.passed:
            raise RuntimeError("this PreparedExecution was checked already")
        with self._device_context():
            check.start()
            check.wait()

    def _device_context(self) -> contextlib.AbstractContextManager[object]:
        """On CUDA, the executor's own stream (the preparation's uploads and the run's work are
        ordered on it)."""
        if self.group.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(_private_stream(self.group.device))

    def _lay_out_all(self) -> None:
        runner = self._runner
        assert runner is not None
        with self._device_context():
            self._check = PlanCheck(self.group, self._digest, self._process.group_rank)
            self._bytes = _bytes_per_group_rank(self.plan, runner.kind_bytes, self._process)
            runner.size_buffer(self.buffer_bytes if self._overlap else 0)
            runner.lay_out(0, len(runner.chunks))

    def _run(self, started: float, *, lay_out_ahead: bool) -> ExecutionStats:
        runner, self._runner = self._runner, None  # the buffer goes with it after the run
        if runner is None:
            raise RuntimeError("this PreparedExecution already ran; prepare the next one")
        group, process = self.group, self._process
        if group.device.type == "cuda":
            stream = _private_stream(group.device)
            stream.wait_stream(torch.cuda.current_stream(group.device))
        with self._device_context():
            check = self._check or PlanCheck(group, self._digest, process.group_rank)
            if not lay_out_ahead:
                runner.size_buffer(self.buffer_bytes if self._overlap else 0)
            runner.run(check)
            done = torch.cuda.Event() if group.device.type == "cuda" else None
            if done is not None:
                done.record()  # after the last write-back, which waited for every transfer
        if done is not None:
            group.wait_for(done.query, "execute's transfers (weights partly moved)")
        for handle in runner.handles:
            handle.raise_if_failed()
        sent, received = self._bytes or _bytes_per_group_rank(self.plan, runner.kind_bytes, process)
        me = process.group_rank
        return ExecutionStats(
            group_rank=me,
            bytes_sent=sent[me],
            bytes_received=received[me],
            bytes_sent_per_rank=sent,
            bytes_received_per_rank=received,
            seconds=tuple(runner.timer.seconds.items()),
            total_seconds=time.perf_counter() - started,
            first_transfer_seconds=runner.first_transfer - started,
            num_chunks=len(runner.chunks),
            peak_extra_bytes=runner.buffer_bytes,
            buffer_bytes=self.buffer_bytes,
            reloaded=tuple(runner.reloaded),
        )


def _copy_path(copy: str, device: torch.device) -> str:
    """The path ``copy`` names on ``device``: "torch", "triton" or "engine"."""
    if copy == "triton" and (device.type != "cuda" or not triton_available()):
        raise ValueError(f"copy='triton' needs a CUDA group and triton installed (device {device})")
    if copy == "engine" and not engine_available(device):
        raise ValueError(
            f"copy='engine' needs a CUDA group and a CUDA runtime >= 12.8 with "
            f"cudaMemcpyBatchAsync (device {device}, torch CUDA {torch.version.cuda})"
        )
    if copy == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return copy


@functools.cache
def _private_stream(device: torch.device) -> torch.cuda.Stream:
    """``execute``'s stream on ``device``: the copy engines refuse the legacy default stream."""
    return torch.cuda.Stream(device)


def required_buffer_bytes(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    world_size: int,
    ranks: GroupRanks | None = None,
) -> int:
    """The least ``buffer_bytes`` with which ``execute`` runs ``plan`` on a group of
    ``world_size`` ranks (then one step per chunk; more buffer gives fewer, larger chunks).

    Args:
        weights: any rank's weights (only their per-slot shapes and dtypes are read).
    """
    if ranks is None:
        ranks = GroupRanks.for_world_size(plan.rank_mapping, world_size)
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes(weights)]
    return min_buffer_bytes(plan, row_bytes, ranks)


def _bytes_per_group_rank(
    plan: TransferPlan, kind_bytes: list[list[int]], process: ProcessRanks
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bytes every group rank sends and receives (exact, from the plan)."""
    slot_bytes = [sum(layer) for layer in kind_bytes]
    table = plan.op_table
    nbytes = np.asarray(slot_bytes, dtype=np.int64)[table.layer[table.transfer]]
    # ProcessRanks.resolve checked that every sender and receiver is in the group.
    old = np.array([-1 if g is None else g for g in process.ranks.old], dtype=np.int64)
    new = np.array([-1 if g is None else g for g in process.ranks.new], dtype=np.int64)
    per_rank = [
        np.bincount(ranks[ends[table.transfer]], weights=nbytes, minlength=process.world_size)
        for ranks, ends in ((old, table.src), (new, table.dst))
    ]
    sent, received = (tuple(int(b) for b in counts) for counts in per_rank)
    return sent, received
