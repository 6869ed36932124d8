"""Run a :class:`TransferPlan`: rewrite every rank's expert weights in place.

Each rank passes the weights of its local slots: ``weights[layer]`` is a sequence of tensors (e.g.
``w13``, ``w2``, scales), each ``[local_slots, ...]`` and contiguous, on the group's device. All
ranks must pass the same number of tensors per layer, with the same per-slot shape and dtype.

How it stays in place within ``buffer_bytes`` of extra memory:

* sends read the weights directly; receives, and local copies whose source slot the layer
  overwrites, land in a per-chunk buffer and are written back once the chunk's transfers are done;
* the plan's steps are packed into chunks whose buffer fits; the plan orders steps so a slot is
  read no later than the chunk that overwrites it, so chunk ``k``'s write-back never touches what a
  later chunk still sends;
* with ``overlap=True`` chunk ``k+1``'s transfers are posted before chunk ``k`` is waited for and
  written back (chunks are then packed to half the budget, so two live chunks fit in it).

Every rank computes the same chunks from the same plan, so peers post matching transfers in the
same order. A collective check (one small ``all_gather_object``) first verifies that all ranks run
the same plan with the same budget and weight shapes; any error found before that check, or by it,
raises on every rank with nothing moved.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from elastic_ep.eplb.transfer_plan import LocalCopy, Reload, Step, Transfer, TransferPlan
from elastic_ep.errors import ElasticEPError
from elastic_ep.groups.stateless_group import P2PHandle, StatelessGroup
from elastic_ep.rank_mapping import RankMapping

DEFAULT_BUFFER_BYTES = 1 << 30
"""Default extra memory ``execute`` may use for staging: 1 GiB."""

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
        seconds: wall time per :class:`Phase` on this rank (on CUDA, ``execute`` synchronizes at
            the end, so their sum bounds the device work; the split between phases is host time).
        total_seconds: wall time of the whole call.
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
    num_chunks: int
    peak_extra_bytes: int
    buffer_bytes: int
    reloaded: tuple[tuple[int, int], ...]

    def phase_seconds(self, phase: Phase) -> float:
        return dict(self.seconds)[phase]


@dataclass(frozen=True)
class _Chunk:
    steps: tuple[Step, ...]
    buffer_bytes: tuple[int, ...]  # per group rank


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
            every replica was on a dead rank; returns one tensor per kind shaped like one slot.
        ranks: group rank of each old and new rank; default
            ``GroupRanks.for_world_size(plan.rank_mapping, group.world_size)``.
        overlap: post the next chunk's transfers before writing back the current one.
    Returns:
        this rank's :class:`ExecutionStats`.
    Raises:
        TypeError/ValueError: bad arguments (nothing moved), e.g. a sender or receiver not in the
            group, weights too small, ``buffer_bytes`` below what one step needs.
        LostExpertsError: experts must be reloaded but ``reload`` is None (nothing moved).
        PeerFailure: a peer died during the transfer (weights partly moved).
    """
    started = time.perf_counter()
    timer = _Timer()
    if not isinstance(plan, TransferPlan):
        raise TypeError(f"plan must be a TransferPlan, got {type(plan).__name__}")
    if not isinstance(group, StatelessGroup):
        raise TypeError(f"group must be a StatelessGroup, got {type(group).__name__}")
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 0:
        raise ValueError(f"buffer_bytes must be a non-negative int, got {buffer_bytes!r}")
    dead = set(plan.dead_ranks) | set(dead_ranks)
    if dead != set(plan.dead_ranks):
        plan = plan.replan(dead)
    timer.add(Phase.PLAN, started)
    layout = _Layout.resolve(plan, group, ranks)
    kinds = _check_weights(plan, weights, layout, group.device)
    slot_bytes = [sum(t[0].numel() * t.element_size() for t in layer) for layer in weights]
    if plan.reloads and reload is None:
        lost = tuple(sorted({(r.layer, r.expert) for r in plan.reloads}))
        raise LostExpertsError(
            f"{len(lost)} (layer, expert) pairs had every replica on dead ranks "
            f"{list(plan.dead_ranks)} and no reload hook was given: {list(lost)}",
            experts=lost,
        )
    chunks = _cut_chunks(plan.steps, slot_bytes, layout, buffer_bytes, overlap)
    _check_same_everywhere(group, plan, buffer_bytes, overlap, kinds, layout)

    runner = _Runner(plan, weights, group, layout, reload, timer)
    pending: tuple[P2PHandle | None, _Staged] | None = None
    for index, chunk in enumerate(chunks):
        staged = runner.stage(chunk)
        handle = runner.post(chunk, staged)
        if pending is not None:
            runner.finish(*pending)
        pending = (handle, staged)
        next_chunk = chunks[index + 1] if index + 1 < len(chunks) else None
        mine = layout.group_rank
        if (
            not overlap
            or next_chunk is None
            or (chunk.buffer_bytes[mine] + next_chunk.buffer_bytes[mine] > buffer_bytes)
        ):
            runner.finish(*pending)
            pending = None
    if pending is not None:
        runner.finish(*pending)
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)

    sent, received = _bytes_per_group_rank(plan, slot_bytes, layout)
    me = layout.group_rank
    return ExecutionStats(
        group_rank=me,
        bytes_sent=sent[me],
        bytes_received=received[me],
        bytes_sent_per_rank=sent,
        bytes_received_per_rank=received,
        seconds=tuple(timer.seconds.items()),
        total_seconds=time.perf_counter() - started,
        num_chunks=len(chunks),
        peak_extra_bytes=runner.peak_bytes,
        buffer_bytes=buffer_bytes,
        reloaded=tuple(runner.reloaded),
    )


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
        for t in plan.transfers:
            if ranks.old[t.src] is None:
                raise ValueError(
                    f"layer {t.layer} expert {t.expert}: sender old rank {t.src} is not in the group"
                )
        for step in plan.steps:
            for op in step.ops:
                dst = op.dst if isinstance(op, Transfer) else op.rank
                if ranks.new[dst] is None:
                    raise ValueError(
                        f"layer {op.layer} expert {op.expert}: receiver new rank {dst} is not in the group"
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


def _cut_chunks(
    steps: Sequence[Step], slot_bytes: list[int], layout: _Layout, budget: int, overlap: bool
) -> list[_Chunk]:
    """Pack consecutive steps greedily into chunks whose buffer fits on every group rank."""
    cap = budget // 2 if overlap else budget
    chunks: list[_Chunk] = []
    current: list[Step] = []
    used = [0] * layout.world_size
    for step in steps:
        cost = [0] * layout.world_size
        for new_rank, experts in step.buffer_experts:
            group_rank = layout.ranks.new[new_rank]
            assert group_rank is not None  # checked by _Layout.resolve
            cost[group_rank] += experts * slot_bytes[step.layer]
        worst = max(range(layout.world_size), key=cost.__getitem__)
        if cost[worst] > budget:
            raise ValueError(
                f"buffer_bytes={budget} cannot hold the smallest movable unit of layer "
                f"{step.layer}: {cost[worst] // slot_bytes[step.layer]} experts "
                f"({cost[worst]} bytes) on group rank {worst}; nothing was moved"
            )
        if current and any(u + c > cap for u, c in zip(used, cost, strict=True)):
            chunks.append(_Chunk(tuple(current), tuple(used)))
            current, used = [], [0] * layout.world_size
        current.append(step)
        used = [u + c for u, c in zip(used, cost, strict=True)]
    if current:
        chunks.append(_Chunk(tuple(current), tuple(used)))
    return chunks


def _check_same_everywhere(
    group: StatelessGroup,
    plan: TransferPlan,
    buffer_bytes: int,
    overlap: bool,
    kinds: tuple[tuple[tuple[tuple[int, ...], str], ...], ...],
    layout: _Layout,
) -> None:
    """One collective: raise on every rank unless all run the same plan, budget and shapes."""
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
    mine = digest.hexdigest()
    everyone = group.all_gather_object(mine)
    differ = [r for r, d in enumerate(everyone) if d != mine]
    if differ:
        raise ValueError(
            f"group ranks {differ} run a different plan, buffer_bytes, overlap, rank layout or "
            f"weight shapes than group rank {layout.group_rank}; nothing was moved"
        )


def _bytes_per_group_rank(
    plan: TransferPlan, slot_bytes: list[int], layout: _Layout
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    sent = [0] * layout.world_size
    received = [0] * layout.world_size
    for t in plan.transfers:
        src, dst = layout.ranks.old[t.src], layout.ranks.new[t.dst]
        assert src is not None and dst is not None  # checked by _Layout.resolve
        sent[src] += slot_bytes[t.layer]
        received[dst] += slot_bytes[t.layer]
    return tuple(sent), tuple(received)


@dataclass
class _Staged:
    """A chunk's buffers on this rank: rows of ``buffers[layer][kind]`` per buffered op."""

    chunk: _Chunk
    buffers: dict[int, list[torch.Tensor]]
    row: dict[int, int]  # id(op) -> row in its layer's buffers
    nbytes: int


class _Runner:
    """Stages, posts and writes back chunks on this rank; tracks buffer memory."""

    def __init__(
        self,
        plan: TransferPlan,
        weights: Sequence[Sequence[torch.Tensor]],
        group: StatelessGroup,
        layout: _Layout,
        reload: ReloadHook | None,
        timer: _Timer,
    ) -> None:
        self.plan, self.weights, self.group, self.layout = plan, weights, group, layout
        self.reload_hook, self.timer = reload, timer
        self.live_bytes = 0
        self.peak_bytes = 0
        self.reloaded: list[tuple[int, int]] = []

    def _is_mine(self, op: Transfer | LocalCopy | Reload) -> bool:
        return (op.dst if isinstance(op, Transfer) else op.rank) == self.layout.new_rank

    def stage(self, chunk: _Chunk) -> _Staged:
        start = time.perf_counter()
        rows: dict[int, list[Transfer | LocalCopy]] = {}
        for step in chunk.steps:
            for op in step.ops:
                buffered = isinstance(op, Transfer) or (isinstance(op, LocalCopy) and op.staged)
                if buffered and self._is_mine(op):
                    rows.setdefault(step.layer, []).append(op)  # type: ignore[arg-type]
        staged = _Staged(chunk, {}, {}, 0)
        for layer, ops in rows.items():
            staged.buffers[layer] = [
                torch.empty((len(ops), *t.shape[1:]), dtype=t.dtype, device=t.device)
                for t in self.weights[layer]
            ]
            staged.nbytes += sum(b.numel() * b.element_size() for b in staged.buffers[layer])
            for row, op in enumerate(ops):
                staged.row[id(op)] = row
                if isinstance(op, LocalCopy):
                    for buf, w in zip(staged.buffers[layer], self.weights[layer], strict=True):
                        buf[row].copy_(w[op.src_slot])
        self.live_bytes += staged.nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.timer.add(Phase.STAGE, start)
        return staged

    def post(self, chunk: _Chunk, staged: _Staged) -> P2PHandle | None:
        start = time.perf_counter()
        ranks = self.layout.ranks
        sends: list[tuple[torch.Tensor, int]] = []
        recvs: list[tuple[torch.Tensor, int]] = []
        for step in chunk.steps:
            for op in step.ops:
                if not isinstance(op, Transfer):
                    continue
                src, dst = ranks.old[op.src], ranks.new[op.dst]
                assert src is not None and dst is not None  # checked by _Layout.resolve
                if op.src == self.layout.old_rank:
                    sends.extend((w[op.src_slot], dst) for w in self.weights[op.layer])
                if op.dst == self.layout.new_rank:
                    row = staged.row[id(op)]
                    recvs.extend((b[row], src) for b in staged.buffers[op.layer])
        handle = self.group.batch_p2p(sends, recvs, async_op=True) if sends or recvs else None
        self.timer.add(Phase.P2P, start)
        return handle

    def finish(self, handle: P2PHandle | None, staged: _Staged) -> None:
        """Wait for the chunk's transfers, then write every op this rank receives into place."""
        start = time.perf_counter()
        if handle is not None:
            handle.wait()
        self.timer.add(Phase.P2P, start)
        start = time.perf_counter()
        for step in staged.chunk.steps:
            weights = self.weights[step.layer]
            for op in step.ops:
                if not self._is_mine(op):
                    continue
                if isinstance(op, Reload):
                    sources = self._reload(op, weights)
                elif id(op) in staged.row:
                    row = staged.row[id(op)]
                    sources = [b[row] for b in staged.buffers[step.layer]]
                else:  # an unstaged local copy: this layer never overwrites its source slot
                    assert isinstance(op, LocalCopy)
                    sources = [w[op.src_slot] for w in weights]
                for w, src in zip(weights, sources, strict=True):
                    for slot in op.dst_slots:
                        w[slot].copy_(src)
        self.live_bytes -= staged.nbytes
        staged.buffers.clear()
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
        return [t.to(w.device) for t, w in zip(tensors, weights, strict=True)]
