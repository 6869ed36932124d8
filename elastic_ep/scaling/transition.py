"""Staging the next epoch: everything of a scale (or rebalance) that can run while the old epoch
serves.

:func:`stage_next_epoch` builds the next epoch's groups as standby, syncs the KV budget, plans the
placement and moves expert weights into *staged* copies. Existing ranks run it on a background
thread (their serving weights and groups are untouched, so a failure costs nothing to undo);
joiners run it on their main thread. The blocking commit then only swaps what was staged in.

On NCCL the staging is split in two by default: :func:`build_next_groups` on the background
thread (no GPU work: communicators are created eagerly, peers connect at the first collective),
then :func:`move_into_next` on the serving thread at one poll every rank reaches at the same
step. NCCL only promises progress when every rank launches on its communicators in one order;
a background thread launching on the next epoch's communicator while the serving thread launches
the forward on the current one interleaves differently on each rank (the elastic demo's first
NCCL scale-up hung that way). Run whole on a background thread, the staging works on a CUDA
stream of its own (:func:`staging_stream`): sharing the serving stream entangles the two threads
(the staging's waits hold up the forward, its host syncs wait for the forward's collectives).

Groups used:

- the next epoch's world group (``"world"``, new members, new rank order);
- the transfer group, which holds every sender and receiver: the new world group for a scale-up
  or a rebalance (same members: the identity rank mapping); for a scale-down the serving world
  group when the transfer runs on the serving thread (its peers are connected already, and a
  new communicator's first transfers cost most of a scale on NCCL), else a separate ``"xfer"``
  group over the old members (old numbering), so leavers can hand their experts off while the
  old world group keeps serving on the main thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from elastic_ep.eplb.executor import ExecutionStats, GroupRanks, ReloadHook, execute
from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.transfer_plan import plan_transfers
from elastic_ep.errors import ReconfigureError
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling.channel import Command
from elastic_ep.scaling.phase import ScalePhase

Weights = Sequence[Sequence[torch.Tensor]]
"""``weights[layer][kind]``: tensor ``[local_slots, ...]`` (first dim = this rank's slots)."""


class PlanFn(Protocol):
    """The placement planner: ``elastic_ep.eplb.plan`` or any function with its signature."""

    def __call__(
        self,
        load: torch.Tensor,
        num_ranks: int,
        slots_per_rank: int,
        *,
        previous: Placement | None = ...,
        rank_mapping: RankMapping | None = ...,
        dead_ranks: Sequence[int] = ...,
    ) -> Placement: ...


def default_planner(
    load: torch.Tensor,
    num_ranks: int,
    slots_per_rank: int,
    *,
    previous: Placement | None = None,
    rank_mapping: RankMapping | None = None,
    dead_ranks: Sequence[int] = (),
) -> Placement:
    """``elastic_ep.eplb.plan`` (movement-aware, elastic)."""
    from elastic_ep.eplb.planner import plan

    return plan(
        load,
        num_ranks,
        slots_per_rank,
        previous=previous,
        rank_mapping=rank_mapping,
        dead_ranks=tuple(dead_ranks),
    )


def control_group(rdzv: Rendezvous, world: StatelessGroup) -> StatelessGroup:
    """The gloo (CPU) group the agent polls on: ``world`` itself when it is gloo, else a gloo
    group ``"ctl"`` of the same members and epoch (a CPU poll never syncs the GPU)."""
    if world.backend == "gloo":
        return world
    return StatelessGroup(
        rdzv, "ctl", world.epoch, world.rank, world.world_size, "gloo", None, world.timeout_s
    )


def abort_in_background(groups: Sequence[StatelessGroup]) -> None:
    """Abort ``groups`` on a daemon thread (each abort ends within the group's timeout)."""
    if groups:
        threading.Thread(
            target=_abort_all, args=(list(groups),), name="elastic-abort", daemon=True
        ).start()


def _abort_all(groups: list[StatelessGroup]) -> None:
    for g in groups:
        g.abort()


@dataclass
class GroupRegistry:
    """Groups built by a staging run, so another thread can abandon it (thread-safe).

    After :meth:`abort_all` the registry is closed: a group the staging thread finishes building
    later is aborted at once and the thread stops with ``ReconfigureError``. So a rollback never
    waits for the staging thread, which ends by itself within its groups' timeout.
    """

    _groups: list[StatelessGroup] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def add(self, group: StatelessGroup) -> StatelessGroup:
        with self._lock:
            if not self._closed:
                self._groups.append(group)
                return group
        group.abort()
        raise ReconfigureError(
            f"staging abandoned; dropped group {group.name!r} epoch {group.epoch}"
        )

    def abort_all(self) -> None:
        """Close the registry and abort its groups on a background thread: aborting a gloo group
        waits for an operation in flight on it (up to the group timeout)."""
        with self._lock:
            groups, self._groups, self._closed = self._groups, [], True
        abort_in_background(groups)


@dataclass(frozen=True)
class NextGroups:
    """The groups a scale builds (see the module docstring).

    Attributes:
        new_group: the next epoch's world group (``None`` on a leaver).
        new_control: its gloo control group (``new_group`` itself on gloo; ``None`` on a leaver).
        transfer_group: holds every sender and receiver (``new_group`` for a scale-up or a
            rebalance; for a scale-down the serving world group or an ``"xfer"`` group over the
            old members, see the module docstring).
        mapping: old rank -> new rank.
    """

    new_group: StatelessGroup | None
    new_control: StatelessGroup | None
    transfer_group: StatelessGroup
    mapping: RankMapping


@dataclass
class StagedEpoch:
    """The result of staging: what the commit swaps in.

    Attributes:
        command: the scale command.
        groups: the next epoch's groups; the transfer group is also where the commit decision
            is taken.
        previous / placement: the placements before and after.
        weights: staged weights of this rank's new slots (``None`` on a leaver).
        changed: per layer, bool [local_slots]: slots whose expert changed (what commit copies).
        kv_budget_bytes: the agreed KV budget (``None`` on a leaver).
        balance: balancedness of ``previous`` and ``placement`` under the load planned for.
        experts_moved: expert weights received over the network by all ranks.
        transfer: the executor's statistics.
    """

    command: Command
    groups: NextGroups
    previous: Placement
    placement: Placement
    weights: list[list[torch.Tensor]] | None
    changed: list[torch.Tensor]
    kv_budget_bytes: int | None
    balance: tuple[float, float]
    experts_moved: int
    transfer: ExecutionStats


@dataclass(frozen=True)
class StageInputs:
    """What a rank brings to the staging of one scale.

    Attributes:
        member: this rank's member id.
        previous: the serving placement (``None`` on a joiner: it learns it).
        weights: this rank's weights; an existing rank's are cloned before anything moves, a
            joiner's (uninitialized) are filled in place.
        load: ``() -> [L, E]`` expert load; only the planning rank calls it.
        kv_bytes: this rank's free KV-cache bytes, ``None`` on a joiner (unknown).
        planner: the placement planner.
        reload: hook for experts whose every replica died.
        buffer_bytes: staging budget of the executor.
        backend / device / timeout_s: of the groups built.
        copy: the executor's copy path (``execute(copy=...)``).
    """

    member: int
    previous: Placement | None
    weights: Weights
    load: Callable[[], torch.Tensor]
    kv_bytes: int | None
    planner: PlanFn
    reload: ReloadHook | None
    buffer_bytes: int
    backend: str
    device: torch.device | str | None
    timeout_s: float
    copy: str = "auto"


def stage_next_epoch(
    rdzv: Rendezvous,
    cmd: Command,
    inputs: StageInputs,
    registry: GroupRegistry,
    on_phase: Callable[[ScalePhase], None],
) -> StagedEpoch:
    """Build, sync, plan and transfer for ``cmd`` (collective over old and new members).

    Raises ``PeerFailure`` if a peer dies or times out, ``ReconfigureError`` if planning failed
    on the planning rank (every rank raises it, after the broadcast).
    """
    groups = build_next_groups(rdzv, cmd, inputs, registry, on_phase)
    return move_into_next(groups, cmd, inputs, on_phase)


def build_next_groups(
    rdzv: Rendezvous,
    cmd: Command,
    inputs: StageInputs,
    registry: GroupRegistry,
    on_phase: Callable[[ScalePhase], None],
    *,
    serving_world: StatelessGroup | None = None,
) -> NextGroups:
    """Build the next epoch's groups (collective over old and new members); on NCCL no GPU work
    is launched (peers connect at the first collective), so a background thread may run it.

    ``serving_world``: the current world group, to carry a scale-down's transfer instead of a new
    ``"xfer"`` group. Pass it only where :func:`move_into_next` runs on the thread that serves on
    it (never beside that thread's own collectives).
    """
    me = inputs.member
    old, new = cmd.old_members, cmd.new_members
    timeout = min(inputs.timeout_s, cmd.timeout_s)
    # Joiners are launched when the scale starts and take their start-up time (interpreter,
    # imports, the engine's loading) to arrive: the scale's timeout bounds that, not the group's.
    arrival = cmd.timeout_s if cmd.joiners else None

    def build(name: str, members: tuple[int, ...], arrival_s: float | None) -> StatelessGroup:
        group = StatelessGroup(
            rdzv,
            name,
            cmd.epoch,
            members.index(me),
            len(members),
            inputs.backend,
            inputs.device,
            timeout,
            connect=False,
            build_timeout_s=arrival_s,
        )
        return registry.add(group)

    on_phase(ScalePhase.PREPARING)
    new_group = new_control = None
    if me in new:
        new_group = build("world", new, arrival)
        new_control = registry.add(control_group(rdzv, new_group))
    if len(new) >= len(old):
        assert new_group is not None  # in a scale-up every member is a new member
        xfer = new_group
    elif serving_world is not None:
        xfer = serving_world
    else:
        xfer = build("xfer", old, None)
    return NextGroups(new_group, new_control, xfer, RankMapping.from_members(old, new))


def move_into_next(
    groups: NextGroups,
    cmd: Command,
    inputs: StageInputs,
    on_phase: Callable[[ScalePhase], None],
) -> StagedEpoch:
    """KV sync, plan and weight transfer over ``groups`` (collective over old and new members).

    Raises ``PeerFailure`` if a peer dies or times out, ``ReconfigureError`` if planning failed
    on the planning rank (every rank raises it, after the broadcast).
    """
    me = inputs.member
    new_group, xfer, mapping = groups.new_group, groups.transfer_group, groups.mapping
    on_phase(ScalePhase.SYNCING_KV)
    budget = None
    if new_group is not None:
        from elastic_ep.kv import sync_kv_budget

        budget = sync_kv_budget(new_group, inputs.kv_bytes)
        _connect_all_pairs(new_group)

    on_phase(ScalePhase.REBALANCING)
    previous, placement, balance = _agree_on_placement(xfer, cmd, mapping, inputs)
    transfers = plan_transfers(previous, placement, mapping)
    # A joiner fills its own (unused) tensors; a leaver only sends from its serving ones; a rank
    # that stays receives into a copy, so its serving weights are untouched until the commit.
    stays = inputs.previous is not None and me in cmd.new_members
    weights = _clone(inputs.weights) if stays else [list(layer) for layer in inputs.weights]
    stats = execute(
        transfers,
        weights,
        xfer,
        buffer_bytes=inputs.buffer_bytes,
        reload=inputs.reload,
        ranks=GroupRanks.for_world_size(mapping, xfer.world_size),
        copy=inputs.copy,
    )
    xfer.barrier()  # every receiver has its weights before anyone may commit
    changed = _changed_slots(previous, placement, cmd.old_members, cmd.new_members, me)
    return StagedEpoch(
        command=cmd,
        groups=groups,
        previous=previous,
        placement=placement,
        weights=weights if me in cmd.new_members else None,
        changed=changed,
        kv_budget_bytes=budget,
        balance=balance,
        experts_moved=int(placement.transfers_from(previous, mapping).sum()),
        transfer=stats,
    )


def _agree_on_placement(
    xfer: StatelessGroup, cmd: Command, mapping: RankMapping, inputs: StageInputs
) -> tuple[Placement, Placement, tuple[float, float]]:
    """Rank 0 of the transfer group (an existing rank) plans; everyone gets its answer: the
    placements before and after, and their balancedness under the load it planned for."""
    answer: tuple[str, Any] = ("error", "")
    if xfer.rank == 0:
        try:
            previous = inputs.previous
            if previous is None:
                raise ReconfigureError("the planning rank has no previous placement")
            load = inputs.load()
            new = inputs.planner(
                load,
                len(cmd.new_members),
                previous.slots_per_rank,
                previous=previous,
                rank_mapping=mapping,
            )
            if new.num_ranks != len(cmd.new_members):
                raise ValueError(
                    f"planner returned {new.num_ranks} ranks, want {len(cmd.new_members)}"
                )
            answer = ("ok", (previous, new, (previous.balancedness(load), new.balancedness(load))))
        except Exception as exc:  # every rank must learn the failure, or the others would hang
            answer = ("error", f"planning failed: {exc!r}")
    status, value = xfer.broadcast_object(answer, src=0)
    if status != "ok":
        raise ReconfigureError(str(value))
    return value


def _connect_all_pairs(group: StatelessGroup) -> None:
    """One tiny all-to-all, so every pair of the new world group is connected before the
    commit: NCCL connects peers lazily, and the engine's first all-to-all on the new epoch (or
    the weight transfer) would otherwise pay it. A tiny one is enough: on H200 larger
    all-to-alls after it found every channel connected (benchmarks/bench_connect.py)."""
    token = torch.zeros(group.world_size, dtype=torch.int32, device=group.device)
    group.all_to_all_single(torch.empty_like(token), token)


def _clone(weights: Weights) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in layer] for layer in weights]


def _changed_slots(
    previous: Placement,
    new: Placement,
    old_members: tuple[int, ...],
    new_members: tuple[int, ...],
    me: int,
) -> list[torch.Tensor]:
    """Per layer, bool [S]: this rank's new slots whose expert differs from what it held there."""
    if me not in new_members:
        return []
    mine = new.local_slots(new_members.index(me))
    if me in old_members:
        before = previous.local_slots(old_members.index(me))
        diff = (mine != before) & (mine >= 0)
    else:
        diff = mine >= 0
    return list(diff.unbind(0))


def commit_weights(serving: Weights, staged: StagedEpoch) -> None:
    """Copy the staged slots that changed into the serving tensors (same addresses)."""
    if staged.weights is None:
        return
    for layer, (dst_layer, src_layer) in enumerate(zip(serving, staged.weights, strict=True)):
        rows = staged.changed[layer].nonzero().flatten()
        if rows.numel() == 0:
            continue
        rows = rows.to(dst_layer[0].device)
        for dst, src in zip(dst_layer, src_layer, strict=True):
            if src.is_cuda:  # staged on the staging stream; read here on the serving one
                src.record_stream(torch.cuda.current_stream(src.device))
            dst.index_copy_(0, rows, src.index_select(0, rows))


@contextmanager
def staging_stream(device: torch.device | str | None) -> Iterator[None]:
    """Run the body on a CUDA stream of its own (CPU: as is); return once its work is done.

    The stream first waits for the calling thread's current stream (the serving weights'
    last writes, e.g. the previous commit's copies); after that nothing of the serving stream
    waits for the staging work or the other way round.
    """
    dev = None if device is None else torch.device(device)
    if dev is None or dev.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.device(dev), torch.cuda.stream(stream):  # a new thread starts on cuda:0
        yield
    stream.synchronize()  # the staged weights are complete before the commit reads them
