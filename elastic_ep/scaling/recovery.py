"""Recovery after a serving rank died: agree on the survivors, shrink, reload lost experts.

Survivors learn of the death from a :class:`~elastic_ep.errors.PeerFailure` at different times
(neighbours at once, others at the group timeout; aborting a broken group resets the
connections of the ranks still waiting on it, which spreads the news). They meet in the store
under the failed epoch's key: the first to arrive decides. It seals the survivor set once every
member has either arrived or been marked dead by the coordinator (``ctl/dead/<member>``), or when
the window ends, takes a fresh epoch number and publishes both. A member that arrives after the
seal is not a survivor: it gets ``ReconfigureError`` and must exit.

:func:`recover_world` runs both steps. If another member dies before any weight moved (while the
survivors build their group or share the plan), the survivors agree again, under the new epoch's
key, and retry without it: the weights still hold the serving placement. A failure after that
(during the transfer), or a plan that cannot be made (e.g. one rank cannot hold every expert),
is final: each survivor reports it (``FAILED``, with the error, under the survivors' epoch; the
coordinator shows it at once) and raises ``ReconfigureError``.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass, replace
from datetime import timedelta

from elastic_ep.eplb.executor import ExecutionStats, execute
from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.transfer_plan import plan_transfers
from elastic_ep.errors import PeerFailure, ReconfigureError
from elastic_ep.groups import Rendezvous, StatelessGroup
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling.channel import ControlChannel, RankReport, put
from elastic_ep.scaling.phase import ScalePhase
from elastic_ep.scaling.transition import StageInputs


@dataclass(frozen=True)
class Survivors:
    """The survivors' agreement: the new epoch and its members (old rank order kept)."""

    epoch: int
    members: tuple[int, ...]
    dead: tuple[int, ...]


def agree_on_survivors(
    rdzv: Rendezvous,
    channel: ControlChannel,
    failed_epoch: int,
    members: tuple[int, ...],
    me: int,
    *,
    window_s: float,
    timeout_s: float,
) -> Survivors:
    """Meet the other survivors of ``failed_epoch`` in the store (bounded by ``timeout_s``)."""
    store = channel.store
    key = f"ctl/recover/{failed_epoch}"
    n = int(store.add(f"{key}/count", 1))
    put(store, f"{key}/member/{n}", str(me).encode())
    if n == 1:
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            arrived = int(store.add(f"{key}/count", 0))
            dead = sum(channel.is_marked_dead(m) for m in members)
            if arrived + dead >= len(members):
                break
            time.sleep(0.005)
        arrived = int(store.add(f"{key}/count", 0))
        try:
            store.wait(
                [f"{key}/member/{i}" for i in range(1, arrived + 1)], timedelta(seconds=timeout_s)
            )
        except RuntimeError as err:
            raise ReconfigureError(
                f"survivors of epoch {failed_epoch} did not sign in: {err}"
            ) from err
        present = {int(store.get(f"{key}/member/{i}")) for i in range(1, arrived + 1)}
        alive = tuple(m for m in members if m in present)
        decision = Survivors(
            rdzv.next_epoch("world"), alive, tuple(m for m in members if m not in present)
        )
        put(store, f"{key}/decision", pickle.dumps(decision))
    else:
        try:  # the decider may take the whole window, then a store round trip
            store.wait([f"{key}/decision"], timedelta(seconds=window_s + timeout_s))
        except RuntimeError as err:
            raise ReconfigureError(f"no survivor decision for epoch {failed_epoch}: {err}") from err
        decision = pickle.loads(store.get(f"{key}/decision"))
    if me not in decision.members:
        raise ReconfigureError(
            f"member {me} reached the recovery of epoch {failed_epoch} after the survivors "
            f"{list(decision.members)} were sealed; it must exit"
        )
    return decision


class _BeforeTransfer(ReconfigureError):
    """A peer failed while the survivors built their group or shared the plan (no weight moved)."""


def recover_world(
    rdzv: Rendezvous,
    channel: ControlChannel,
    failed_epoch: int,
    members: tuple[int, ...],
    inputs: StageInputs,
    *,
    window_s: float,
    timeout_s: float,
) -> tuple[Survivors, RecoveredEpoch]:
    """Agree on the survivors of ``failed_epoch`` and rebuild (see the module docstring).

    ``members`` are the failed epoch's, in rank order (``inputs.previous`` is placed on them).
    Retries while members keep dying before the transfer, at most once per member.

    Raises:
        ReconfigureError: this rank is not a survivor, or the recovery failed (reported).
    """
    me = inputs.member
    candidates = members
    for _ in range(len(members)):
        try:
            agreed = agree_on_survivors(
                rdzv, channel, failed_epoch, candidates, me, window_s=window_s, timeout_s=timeout_s
            )
        except ReconfigureError:
            raise
        except RuntimeError as err:  # the store itself failed (e.g. its host is gone)
            raise ReconfigureError(
                f"recovery of epoch {failed_epoch}: store failed: {err}"
            ) from err
        survivors = replace(agreed, dead=tuple(m for m in members if m not in agreed.members))
        try:
            return survivors, rebuild_after_failure(rdzv, survivors, members, inputs)
        except _BeforeTransfer:
            failed_epoch, candidates = survivors.epoch, survivors.members  # agree again
        except ReconfigureError as err:
            report_failed_recovery(channel, survivors, me, str(err))
            raise
        except RuntimeError as err:  # PeerFailure in the transfer, a store error
            report_failed_recovery(channel, survivors, me, f"{type(err).__name__}: {err}")
            raise ReconfigureError(
                f"recovery to epoch {survivors.epoch} failed during the transfer: {err}"
            ) from err
    raise ReconfigureError(f"recovery of epoch {failed_epoch}: every retry lost another member")


def report_failed_recovery(
    channel: ControlChannel, survivors: Survivors, me: int, error: str
) -> None:
    """Tell the coordinator that the recovery to ``survivors.epoch`` failed on this rank
    (best effort: the store may be gone too)."""
    with contextlib.suppress(RuntimeError):
        channel.report(
            RankReport(
                survivors.epoch,
                me,
                ScalePhase.FAILED,
                members=survivors.members,
                dead_members=survivors.dead,
                error=error,
            )
        )
        channel.add_recovery(survivors.epoch)


@dataclass
class RecoveredEpoch:
    """The survivors' new epoch after :func:`rebuild_after_failure`."""

    group: StatelessGroup
    mapping: RankMapping
    placement: Placement
    lost_experts: int
    transfer: ExecutionStats


def rebuild_after_failure(
    rdzv: Rendezvous,
    survivors: Survivors,
    old_members: tuple[int, ...],
    inputs: StageInputs,
) -> RecoveredEpoch:
    """Build the survivors' world group, re-plan without the dead, move and reload in place.

    ``inputs`` are this rank's, as for a scale; ``inputs.previous`` is the serving placement
    (required) and ``inputs.kv_bytes`` is not used.
    """
    previous = inputs.previous
    if previous is None:
        raise ValueError("recovery needs the serving placement (inputs.previous is None)")
    me = inputs.member
    mapping = RankMapping.from_members(old_members, survivors.members)
    dead = tuple(old_members.index(m) for m in survivors.dead)
    try:
        group = StatelessGroup(
            rdzv,
            "world",
            survivors.epoch,
            survivors.members.index(me),
            len(survivors.members),
            inputs.backend,
            inputs.device,
            inputs.timeout_s,
        )
    except PeerFailure as err:
        raise _BeforeTransfer(f"building epoch {survivors.epoch} failed: {err}") from err
    try:
        answer: tuple[str, object] = ("error", "")
        if group.rank == 0:
            try:
                new = inputs.planner(
                    inputs.load(),
                    len(survivors.members),
                    previous.slots_per_rank,
                    previous=previous,
                    rank_mapping=mapping,
                    dead_ranks=dead,
                )
                answer = ("ok", new)
            except Exception as exc:
                answer = ("error", f"planning without dead ranks {list(dead)} failed: {exc!r}")
        try:
            status, value = group.broadcast_object(answer, src=0)
        except PeerFailure as err:
            raise _BeforeTransfer(f"sharing the plan of epoch {survivors.epoch}: {err}") from err
        if status != "ok":
            raise ReconfigureError(str(value))
        assert isinstance(value, Placement)
        transfers = plan_transfers(previous, value, mapping, dead_ranks=dead)
        stats = execute(
            transfers,
            inputs.weights,
            group,
            buffer_bytes=inputs.buffer_bytes,
            dead_ranks=dead,
            reload=inputs.reload,
        )
        lost = int(previous.lost_with(dead).sum()) if dead else 0
        return RecoveredEpoch(group, mapping, value, lost, stats)
    except BaseException:
        group.abort()
        raise
