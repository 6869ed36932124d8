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
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from elastic_ep.eplb.copy_engine import batch_copy, engine_available
from elastic_ep.eplb.exec_chunks import Chunk, cut_chunks, min_buffer_bytes
from elastic_ep.eplb.exec_layout import ChunkLayout, RowSet, aligned, kinds_of, lay_out_chunks
from elastic_ep.eplb.row_copy import RowTable, ensure_warm, torch_copy_rows, triton_available
from elastic_ep.eplb.transfer_plan import Reload, Transfer, TransferPlan
from elastic_ep.errors import ElasticEPError
from elastic_ep.groups.stateless_group import P2PBatch, StatelessGroup, WorkHandle
from elastic_ep.rank_mapping import RankMapping

ALIGN_ANCHOR = 16
"""Bytes of the row tables' anchor when the staging buffer is empty."""

DEFAULT_BUFFER_BYTES = 1 << 30
"""Default extra memory ``execute`` may use for staging: 1 GiB."""

COPY_PATHS = ("auto", "torch", "triton", "engine")
"""Values of ``execute``'s ``copy`` argument."""

SMALL_PLAN_CHUNKS = 4
"""Plans of at most this many chunks are laid out in one call (see ``_Runner.launch``)."""

ReloadHook = Callable[[int, int], Sequence[torch.Tensor]]
"""``reload(layer, expert) -> tensors``: one tensor per weight kind, each shaped like one slot."""


class LostExpertsError(ElasticEPError):
    """Experts whose every replica was on a dead rank, and no ``reload`` hook was given.

    Attributes:
        experts: the ``(layer, expert)`` pairs that cannot be sent, ascending.
    """

    def __init__(self, message: str, *, experts: tuple[tuple[int, int], ...]):
        super().__init__(message)
        self.experts = experts


class Phase(enum.Enum):
    """Phases of ``execute`` timed in :class:`ExecutionStats`."""

    PLAN = "plan"
    STAGE = "stage"
    P2P = "p2p"
    WRITE_BACK = "write_back"


@dataclass(frozen=True)
class GroupRanks:
    """Rank, in the group that runs the plan, of every old and every new rank.

    Attributes:
        old: per old rank (``previous`` numbering): its group rank, or ``None`` if not a member.
        new: per new rank (``new`` numbering): its group rank, or ``None`` if not a member.
    """

    old: tuple[int | None, ...]
    new: tuple[int | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "old", tuple(self.old))
        object.__setattr__(self, "new", tuple(self.new))

    @classmethod
    def new_numbering(cls, mapping: RankMapping) -> GroupRanks:
        """The new epoch's group (scale-up, failure): old ranks through ``mapping``."""
        return cls(mapping.old_to_new, tuple(range(mapping.new_world_size)))

    @classmethod
    def old_numbering(cls, mapping: RankMapping) -> GroupRanks:
        """The old epoch's group (scale-down): new ranks through ``mapping``."""
        return cls(tuple(range(mapping.old_world_size)), mapping.new_to_old)

    @classmethod
    def for_world_size(cls, mapping: RankMapping, world_size: int) -> GroupRanks:
        """New numbering if ``world_size`` is the new world size, else old numbering if it is
        the old one (a tie picks the new numbering)."""
        if world_size == mapping.new_world_size:
            return cls.new_numbering(mapping)
        if world_size == mapping.old_world_size:
            return cls.old_numbering(mapping)
        raise ValueError(
            f"group of {world_size} ranks matches neither the new ({mapping.new_world_size}) nor "
            f"the old ({mapping.old_world_size}) world size; pass ranks=GroupRanks(...)"
        )


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


class _Timer:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(Phase, 0.0)

    def add(self, phase: Phase, start: float) -> None:
        self.seconds[phase] += time.perf_counter() - start


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
    timer = _Timer()
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
    layout = _Layout.resolve(plan, group, ranks)
    kinds = _check_weights(plan, weights, layout, group.device)
    if plan.reloads and reload is None:
        lost = tuple(sorted({(r.layer, r.expert) for r in plan.reloads}))
        raise LostExpertsError(
            f"{len(lost)} (layer, expert) pairs had every replica on dead ranks "
            f"{list(plan.dead_ranks)} and no reload hook was given: {list(lost)}",
            experts=lost,
        )
    kind_bytes = _kind_bytes(weights)
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes]
    chunks = cut_chunks(plan, row_bytes, layout.ranks, layout.world_size, buffer_bytes, overlap)
    copy_path = _copy_path(copy, group.device)
    if copy_path in ("triton", "torch"):
        ensure_warm(group.device, copy_path)  # not at a first launch mid-run: see ensure_warm
    runner = _Runner(
        plan,
        weights,
        group,
        layout,
        chunks,
        kind_bytes,
        reload,
        timer,
        copy_path,
    )
    digest = _digest(plan, buffer_bytes, overlap, kinds, layout)
    return PreparedExecution(plan, group, layout, runner, digest, buffer_bytes, overlap)


class PreparedExecution:
    """One rank's part of a plan's execution, prepared by :func:`prepare_execution`; run it
    once."""

    def __init__(
        self,
        plan: TransferPlan,
        group: StatelessGroup,
        layout: _Layout,
        runner: _Runner,
        digest: int,
        buffer_bytes: int,
        overlap: bool,
    ) -> None:
        self.plan, self.group, self._layout, self._digest = plan, group, layout, digest
        self.buffer_bytes, self._overlap = buffer_bytes, overlap
        self._runner: _Runner | None = runner
        # Made by _lay_out_all when prepared ahead, else by the run (the byte counts after it).
        self._check: _PlanCheck | None = None
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
            self._check = _PlanCheck(self.group, self._digest, self._layout.group_rank)
            self._bytes = _bytes_per_group_rank(self.plan, runner.kind_bytes, self._layout)
            runner.size_buffer(self.buffer_bytes if self._overlap else 0)
            runner.lay_out(0, len(runner.chunks))

    def _run(self, started: float, *, lay_out_ahead: bool) -> ExecutionStats:
        runner, self._runner = self._runner, None  # the buffer goes with it after the run
        if runner is None:
            raise RuntimeError("this PreparedExecution already ran; prepare the next one")
        group, layout = self.group, self._layout
        if group.device.type == "cuda":
            stream = _private_stream(group.device)
            stream.wait_stream(torch.cuda.current_stream(group.device))
        with self._device_context():
            check = self._check or _PlanCheck(group, self._digest, layout.group_rank)
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
        sent, received = self._bytes or _bytes_per_group_rank(self.plan, runner.kind_bytes, layout)
        me = layout.group_rank
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
    kind_bytes = _kind_bytes(weights)
    row_bytes = [sum(aligned(b) for b in layer) for layer in kind_bytes]
    return min_buffer_bytes(plan, row_bytes, ranks, world_size)


@dataclass(frozen=True)
class _Layout:
    """Where this process sits: its group rank, old rank and new rank, and everyone's."""

    ranks: GroupRanks
    group_rank: int
    world_size: int
    old_rank: int | None
    new_rank: int | None

    @classmethod
    def resolve(
        cls, plan: TransferPlan, group: StatelessGroup, ranks: GroupRanks | None
    ) -> _Layout:
        mapping = plan.rank_mapping
        if ranks is None:
            ranks = GroupRanks.for_world_size(mapping, group.world_size)
        if not isinstance(ranks, GroupRanks):
            raise TypeError(f"ranks must be a GroupRanks, got {type(ranks).__name__}")
        if len(ranks.old) != mapping.old_world_size or len(ranks.new) != mapping.new_world_size:
            raise ValueError(
                f"ranks covers {len(ranks.old)} old and {len(ranks.new)} new ranks, the plan has "
                f"{mapping.old_world_size} and {mapping.new_world_size}"
            )
        for what, table in (("old", ranks.old), ("new", ranks.new)):
            members = [g for g in table if g is not None]
            if any(not 0 <= g < group.world_size for g in members) or len(set(members)) != len(
                members
            ):
                raise ValueError(
                    f"ranks.{what} = {list(table)} is not a set of distinct ranks of a group of {group.world_size}"
                )
        for old, new in enumerate(mapping.old_to_new):
            if new is not None and ranks.old[old] != ranks.new[new]:
                raise ValueError(
                    f"old rank {old} is new rank {new}, but ranks puts them at group ranks "
                    f"{ranks.old[old]} and {ranks.new[new]}"
                )
        for old in plan.sending_ranks:
            if ranks.old[old] is None:
                t = next(t for t in plan.transfers if t.src == old)
                raise ValueError(
                    f"layer {t.layer} expert {t.expert}: sender old rank {old} is not in the group"
                )
        for new in plan.receiving_ranks:
            if ranks.new[new] is None:
                op = next(
                    op
                    for step in plan.steps
                    for op in step.ops
                    if (op.dst if isinstance(op, Transfer) else op.rank) == new
                )
                raise ValueError(
                    f"layer {op.layer} expert {op.expert}: receiver new rank {new} is not in the group"
                )
        me = group.rank
        return cls(
            ranks,
            me,
            group.world_size,
            ranks.old.index(me) if me in ranks.old else None,
            ranks.new.index(me) if me in ranks.new else None,
        )


def _check_weights(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    layout: _Layout,
    device: torch.device,
) -> tuple[tuple[tuple[tuple[int, ...], str], ...], ...]:
    """Validate ``weights``; returns the per-slot (shape, dtype) of every kind of every layer."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a sequence (per layer) of sequences of tensors")
    if len(weights) != plan.new.num_layers:
        raise ValueError(f"weights has {len(weights)} layers, the plan {plan.new.num_layers}")
    needed = max(
        plan.previous.slots_per_rank if layout.old_rank is not None else 0,
        plan.new.slots_per_rank if layout.new_rank is not None else 0,
    )
    kinds = []
    for layer, tensors in enumerate(weights):
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence) or not tensors:
            raise TypeError(f"weights[{layer}] must be a non-empty sequence of tensors")
        signature = []
        for k, t in enumerate(tensors):
            where = f"weights[{layer}][{k}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where} must be a torch.Tensor, got {type(t).__name__}")
            if t.device.type != device.type:
                raise ValueError(f"{where} is on {t.device}, the group uses {device}")
            if t.dim() < 1 or t.shape[0] < needed:
                raise ValueError(
                    f"{where} has shape {tuple(t.shape)}: its first dim must be >= {needed} "
                    f"local slots"
                )
            if not t.is_contiguous():
                raise ValueError(f"{where} must be contiguous")
            signature.append((tuple(t.shape[1:]), str(t.dtype)))
        kinds.append(tuple(signature))
    return tuple(kinds)


def _kind_bytes(weights: Sequence[Sequence[torch.Tensor]]) -> list[list[int]]:
    """``[layer][kind]``: bytes of one slot (no tensor views: ``t[0]`` costs ~2 us each)."""
    return [[math.prod(t.shape[1:]) * t.element_size() for t in layer] for layer in weights]


def _digest(
    plan: TransferPlan,
    buffer_bytes: int,
    overlap: bool,
    kinds: tuple[tuple[tuple[tuple[int, ...], str], ...], ...],
    layout: _Layout,
) -> int:
    """This rank's fingerprint of the plan, budget, options and weight shapes (56 bits)."""
    digest = hashlib.sha256()
    for placement in (plan.previous, plan.new):
        digest.update(placement.phy2log.numpy().tobytes())
        digest.update(repr((placement.num_logical, placement.num_ranks)).encode())
    digest.update(
        repr(
            (
                plan.rank_mapping,
                plan.dead_ranks,
                plan.nodes,
                buffer_bytes,
                overlap,
                kinds,
                layout.ranks,
            )
        ).encode()
    )
    return int.from_bytes(digest.digest()[:7], "little")  # fits int64 with its negation


class _PlanCheck:
    """One small all-reduce, so every rank can raise unless all have the same :func:`_digest`
    (``max(h) == h`` and ``max(-h) == -h`` on every rank iff all ranks have the same ``h``).

    Built ahead (in :func:`prepare_execution`), started before the first pack, awaited before
    the first transfer, within the group's timeout."""

    def __init__(self, group: StatelessGroup, digest: int, group_rank: int) -> None:
        self.group, self.digest, self.group_rank = group, digest, group_rank
        if group.device.type == "cuda":
            # Filled on the device, read back into pinned memory: the run copies nothing to
            # the device (a 16-byte upload took 0.4 ms of host time in a 2x H200 timeline).
            self.both = torch.full((2,), digest, dtype=torch.int64, device=group.device)
            self.both[1:].neg_()
            self.result = torch.empty(2, dtype=torch.int64, pin_memory=True)
            self.arrived: torch.cuda.Event | None = torch.cuda.Event()
        else:
            self.both = self.result = torch.tensor([digest, -digest], dtype=torch.int64)
            self.arrived = None
        self.reduced: WorkHandle | None = None
        self.passed = False

    def start(self) -> None:
        """Post the all-reduce (on CUDA it waits for nothing of this stream's but the fill)."""
        self.reduced = self.group.all_reduce(
            self.both, op=torch.distributed.ReduceOp.MAX, async_op=True
        )
        if self.arrived is not None:
            self.reduced.wait()
            self.result.copy_(self.both, non_blocking=True)
            self.arrived.record()

    def wait(self) -> None:
        """Raise unless every rank has this digest (PeerFailure past the group's timeout, or
        once torch's watchdog has failed the reduction: the event completes then too, over an
        unreduced result)."""
        assert self.reduced is not None, "start() comes first"
        if self.arrived is None:
            self.reduced.wait()
        else:
            self.group.wait_for(self.arrived.query, "execute's plan check (nothing was moved)")
            self.reduced.raise_if_failed()
        if self.result.tolist() != [self.digest, -self.digest]:
            raise ValueError(
                f"group rank {self.group_rank}: the ranks of the group run different plans, "
                "buffer_bytes, overlap, rank layouts or weight shapes; nothing was moved"
            )
        self.passed = True


def _bytes_per_group_rank(
    plan: TransferPlan, kind_bytes: list[list[int]], layout: _Layout
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Bytes every group rank sends and receives (exact, from the plan)."""
    slot_bytes = [sum(layer) for layer in kind_bytes]
    table = plan.op_table
    nbytes = np.asarray(slot_bytes, dtype=np.int64)[table.layer[table.transfer]]
    # _Layout.resolve checked that every sender and receiver is in the group.
    old = np.array([-1 if g is None else g for g in layout.ranks.old], dtype=np.int64)
    new = np.array([-1 if g is None else g for g in layout.ranks.new], dtype=np.int64)
    per_rank = [
        np.bincount(ranks[ends[table.transfer]], weights=nbytes, minlength=layout.world_size)
        for ranks, ends in ((old, table.src), (new, table.dst))
    ]
    sent, received = (tuple(int(b) for b in counts) for counts in per_rank)
    return sent, received


def _torch_copy(flat: Sequence[torch.Tensor | None], rows: RowSet) -> None:
    """One multi-tensor copy of ``rows`` between byte views (``flat[tensor number]``)."""
    torch_copy_rows(
        flat, rows.src_tensor, rows.src_offset, rows.dst_tensor, rows.dst_offset, rows.nbytes
    )


@dataclass(frozen=True)
class _Launches:
    """One chunk's layout, its transfers (checked, None if it has none) and its three copy
    launches: pack, slot-to-slot copies (first: other writes may overwrite their sources), and
    write-back."""

    layout: ChunkLayout
    transfers: P2PBatch | None
    pack: Callable[[], None]
    direct: Callable[[], None]
    unpack: Callable[[], None]


class _Runner:
    """Runs this rank's part of the chunks in one preallocated buffer.

    Even chunks sit at the start of the buffer and odd chunks at its end, so two consecutive
    chunks never share bytes when both fit; a chunk reuses the bytes of the chunk two before it,
    which was written back (stream-ordered on CUDA) before this one is packed. Chunks are laid out
    in growing batches just before they run (see :meth:`launch`).
    """

    def __init__(
        self,
        plan: TransferPlan,
        weights: Sequence[Sequence[torch.Tensor]],
        group: StatelessGroup,
        layout: _Layout,
        chunks: list[Chunk],
        kind_bytes: list[list[int]],
        reload: ReloadHook | None,
        timer: _Timer,
        copy_path: str,
    ) -> None:
        self.plan, self.weights, self.group, self.layout = plan, weights, group, layout
        self.chunks, self.kind_bytes, self.reload_hook = chunks, kind_bytes, reload
        self.timer, self.copy_path = timer, copy_path
        self.chunk_starts = [0, *itertools.accumulate(len(c.steps) for c in chunks)]
        self.launches: list[_Launches] = []
        self.reloaded: list[tuple[int, int]] = []
        self.first_transfer = 0.0  # perf_counter when the first chunk is posted (see run)
        self.handles: list[WorkHandle] = []  # every posted chunk's, checked after the run

    def size_buffer(self, overlap_budget: int) -> None:
        """Decide which chunks overlap and allocate the buffer, from the estimated sizes (upper
        bounds of the laid-out ones)."""
        sizes = [c.estimate[self.layout.group_rank] for c in self.chunks]
        # Overlap chunk k+1 with chunk k only if both fit in the budget at once.
        self.overlapped = [a + b <= overlap_budget for a, b in itertools.pairwise(sizes)] + [False]
        pairs = [a + b for a, b, o in zip(sizes, sizes[1:], self.overlapped, strict=False) if o]
        self.buffer_bytes = max([0, *sizes, *pairs])
        self.buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8, device=self.group.device)
        # Every tensor by its number in a layout's rows: byte views for the torch path,
        # addresses for the fused ones (once per call, not per batch).
        kinds = kinds_of(self.kind_bytes)
        tensors: list[torch.Tensor | None] = [self.buffer]
        for layer in self.weights:
            tensors.extend([*layer, *[None] * (kinds - len(layer))])
        if self.copy_path == "torch":
            self.flat = [None if t is None else t.view(-1).view(torch.uint8) for t in tensors]
        else:
            self.address = np.array([0 if t is None else t.data_ptr() for t in tensors])

    def launch(self, k: int) -> _Launches:
        """Chunk ``k``'s launches. A layout's cost is mostly fixed (0.2 ms of host time per call
        on the 2-core VM, 1.4 ms on the 2x H200 machine's host), so a plan of up to
        ``SMALL_PLAN_CHUNKS`` chunks is laid out at once; a larger one in batches of 2, 4, 8, ...
        chunks: chunks 0 and 1 first (chunk 0 is short, see ``exec_chunks.RAMP``), so that the
        first transfer starts early, then each batch while the chunk before it transfers."""
        if k == len(self.launches):
            chunks = len(self.chunks)
            self.lay_out(k, chunks if chunks <= SMALL_PLAN_CHUNKS else min(chunks, 2 * k + 2))
        return self.launches[k]

    def lay_out(self, first: int, last: int) -> None:
        """Lay out chunks ``first`` to ``last`` (exclusive; numpy, a few dozen array operations
        however many) and turn their rows into launches; the Triton path lists every launch of
        the batch in one row table, uploaded once."""
        start = time.perf_counter()
        layout = lay_out_chunks(
            self.plan,
            self.chunk_starts,
            self.kind_bytes,
            self.layout.ranks,
            self.layout.old_rank,
            self.layout.new_rank,
            self.buffer_bytes,
            first,
            last,
        )
        row_sets = (layout.pack, layout.direct, layout.unpack)
        if self.copy_path == "torch":
            copies = self._torch_copies(self.flat, row_sets, len(layout.chunks))
        else:
            src = [self.address[r.src_tensor] + r.src_offset for r in row_sets]
            dst = [self.address[r.dst_tensor] + r.dst_offset for r in row_sets]
            copies = self._fused_copies(src, dst, row_sets, len(layout.chunks))
        self.launches.extend(
            _Launches(chunk, self._transfers(chunk), *(kind[c] for kind in copies))
            for c, chunk in enumerate(layout.chunks)
        )
        self.timer.add(Phase.PLAN, start)

    def _transfers(self, chunk: ChunkLayout) -> P2PBatch | None:
        """The chunk's transfers between buffer regions, checked now (off the run's path)."""
        if not chunk.sends and not chunk.recvs:
            return None
        return self.group.prepare_p2p(
            [(self.buffer[o : o + n], peer) for peer, o, n in chunk.sends],
            [(self.buffer[o : o + n], peer) for peer, o, n in chunk.recvs],
        )

    @staticmethod
    def _torch_copies(
        flat: list[torch.Tensor | None], row_sets: Sequence[RowSet], chunks: int
    ) -> list[list[Callable[[], None]]]:
        """Per launch kind and chunk, one multi-tensor copy between byte views (partials of the
        free function ``_torch_copy``: a launch that held the runner would keep the buffer alive
        in a reference cycle after the call)."""
        return [
            [functools.partial(_torch_copy, flat, rows.of_chunk(c)) for c in range(chunks)]
            for rows in row_sets
        ]

    def _fused_copies(
        self,
        src: list[np.ndarray],
        dst: list[np.ndarray],
        row_sets: Sequence[RowSet],
        chunks: int,
    ) -> list[list[Callable[[], None]]]:
        """Per launch kind and chunk, one launch: on the Triton path every launch of the batch
        is a slice of one row table (pack launches, then slot-to-slot, then write-back),
        uploaded once; on the copy engines one batch copy each."""
        if self.copy_path == "engine":
            stream = torch.cuda.current_stream(self.group.device)
            return [
                [
                    functools.partial(batch_copy, s[a:b], d[a:b], rows.nbytes[a:b], stream)
                    for a, b in itertools.pairwise(rows.bounds.tolist())
                ]
                for s, d, rows in zip(src, dst, row_sets, strict=True)
            ]
        # Row tables address everything from a live allocation (an empty buffer has none).
        anchor = (
            self.buffer
            if self.buffer_bytes
            else torch.empty(ALIGN_ANCHOR, dtype=torch.uint8, device=self.group.device)
        )
        table = RowTable(anchor)
        launches = table.add_launches(
            np.concatenate(src),
            np.concatenate(dst),
            np.concatenate([r.nbytes for r in row_sets]),
            np.concatenate([np.diff(r.bounds) for r in row_sets]),
        )
        table.upload()
        return [
            [table.launcher(r) for r in launches[i * chunks : (i + 1) * chunks]]
            for i in range(len(row_sets))
        ]

    def run(self, check: _PlanCheck) -> None:
        """Run every chunk. Stream order per chunk ``k``: pack, post its transfers, then chunk
        ``k-1``'s slot-to-slot copies and write-back (nothing a post waits for follows a pack),
        then pack chunk ``k+1`` into the buffer half chunk ``k-1`` freed. The last chunk's (and
        a chunk's that no other overlaps) slot-to-slot copies go right after its post, beside its
        transfer: a chunk's write-back may overwrite their sources, an earlier chunk's cannot.
        Each chunk's slot-to-slot copies thus come before its own write-back and every later
        chunk's. The plan check is posted before chunk 0's pack (packing reads the weights and
        writes only the buffer) and awaited before the first transfer."""
        if not check.passed:  # else PreparedExecution.check ran it ahead
            check.start()
        chunks = len(self.chunks)
        if chunks:
            self.pack(self.launch(0))
        if not check.passed:
            check.wait()
        self.first_transfer = time.perf_counter()
        directs = 0  # chunks whose slot-to-slot copies are launched
        posted: tuple[WorkHandle | None, _Launches] | None = None
        for k in range(chunks):
            chunk = self.launch(k)
            handle = self.post(chunk)
            alone = k == chunks - 1 or not self.overlapped[k]
            while directs <= (k if alone else k - 1):
                self.direct(self.launch(directs))
                directs += 1
            if posted is not None:
                self.write_back(*posted)
            posted = (handle, chunk)
            if not self.overlapped[k]:  # chunk k+1 needs chunk k's buffer
                self.write_back(*posted)
                posted = None
            if k + 1 < chunks:
                self.pack(self.launch(k + 1))
        if posted is not None:
            self.write_back(*posted)

    def pack(self, chunk: _Launches) -> None:
        """Copy what this rank sends, and staged local-copy sources, into the chunk's region
        (one launch: few rows per segment make per-segment gathers slow)."""
        start = time.perf_counter()
        chunk.pack()
        self.timer.add(Phase.STAGE, start)

    def direct(self, chunk: _Launches) -> None:
        """The chunk's slot-to-slot copies (before its write-back)."""
        start = time.perf_counter()
        chunk.direct()
        self.timer.add(Phase.WRITE_BACK, start)

    def post(self, chunk: _Launches) -> WorkHandle | None:
        start = time.perf_counter()
        handle = None if chunk.transfers is None else chunk.transfers.post()
        if handle is not None:
            self.handles.append(handle)
        self.timer.add(Phase.P2P, start)
        return handle

    def write_back(self, handle: WorkHandle | None, chunk: _Launches) -> None:
        """Wait for the chunk's transfers, then write everything this rank receives into place
        (after the chunk's slot-to-slot copies)."""
        start = time.perf_counter()
        if handle is not None:
            handle.wait()
        self.timer.add(Phase.P2P, start)
        start = time.perf_counter()
        chunk.unpack()
        for op in chunk.layout.reloads:
            weights = self.weights[op.layer]
            for w, src in zip(weights, self._reload(op, weights), strict=True):
                for slot in op.dst_slots:
                    w[slot].copy_(src, non_blocking=True)
        self.timer.add(Phase.WRITE_BACK, start)

    def _reload(self, op: Reload, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert self.reload_hook is not None  # execute raised LostExpertsError otherwise
        tensors = list(self.reload_hook(op.layer, op.expert))
        if len(tensors) != len(weights) or any(
            not isinstance(t, torch.Tensor) or t.shape != w.shape[1:] or t.dtype != w.dtype
            for t, w in zip(tensors, weights, strict=False)
        ):
            raise ValueError(
                f"reload({op.layer}, {op.expert}) must return {len(weights)} tensors shaped "
                f"{[(tuple(w.shape[1:]), w.dtype) for w in weights]}, got "
                f"{[(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t for t in tensors]}"
            )
        self.reloaded.append((op.layer, op.expert))
        if weights[0].device.type != "cuda":
            return tensors
        # From pinned memory the upload is queued on the stream; from pageable memory torch
        # would wait for the stream first, i.e. for the transfers before it, with no bound when
        # a peer has died (a test's survivor hung there). The host-to-host copy is the price.
        return [t.pin_memory() if t.device.type == "cpu" else t for t in tensors]
