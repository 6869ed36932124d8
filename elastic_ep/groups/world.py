"""ElasticWorld: membership of an elastic job, its epochs, and each epoch's process groups.

Members have stable integer ids; an epoch is an ordered member list, and a member's rank in the
epoch is its position in that list. Each epoch has a world group (``<name>@<epoch>``) and the
sub-groups of a :class:`~elastic_ep.groups.layout.GroupLayout`.

Changing epochs is two-phase so that serving never stops while the next epoch is built:

1. ``prepare(new_members, epoch=N)``, called by every member of the new epoch (old members and
   joiners alike; leavers may call it too), builds epoch N's groups as *standby* while the
   current epoch's groups keep working. Both are usable at once, e.g. to move expert weights to
   joiners over the new groups before switching. It returns a :class:`PendingEpoch`.
2. ``commit(pending)`` switches: the new groups become current, the old are torn down on a
   background thread (:meth:`ElasticWorld.join_retired` waits for it, bounded) and the :class:`~elastic_ep.rank_mapping.RankMapping`
   from the old epoch to the new is returned. ``discard(pending)`` drops the standby instead.

Epoch numbers: the caller passes them, and every member of one attempt must pass the same number
(a coordinator picks it, e.g. with :meth:`Rendezvous.next_epoch`, and tells the members and the
joiners). A number is never reused: a world refuses an epoch that is not greater than every
epoch it has attempted, failed attempts included, and a group ``(name, epoch)`` can be built only
once per job, so keys of an aborted attempt are never read by a later one.

Failures: if prepare fails (a peer dies or never arrives, members disagree, bad input), its
partial groups are aborted, the current epoch's groups stay usable and :class:`ReconfigureError`
is raised; the next attempt (with a new epoch number) works. After a PeerFailure on the current
groups, the survivors simply reconfigure without the dead member: prepare never touches the
current groups, and commit aborts broken ones, which never hangs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import torch

from elastic_ep.errors import PeerFailure, ReconfigureError
from elastic_ep.groups.layout import GroupLayout
from elastic_ep.groups.rendezvous import Rendezvous, check_timeout, prefix_of
from elastic_ep.groups.stateless_group import StatelessGroup, parse_device
from elastic_ep.rank_mapping import RankMapping

WORLD = "world"
"""Key of the world group in :attr:`PendingEpoch.groups`."""


class MemberState(Enum):
    """Whether this process is in the current epoch of its world."""

    OUTSIDE = "outside"  # not started yet, or left
    MEMBER = "member"


@dataclass(frozen=True)
class PendingEpoch:
    """An epoch whose groups are built (standby) but not yet current.

    Attributes:
        epoch: the new epoch number.
        members: ordered member ids of the new epoch (rank = position).
        rank: this process's rank in the new epoch, or None if it is leaving.
        old_epoch: the epoch it replaces (None when starting from nothing).
        old_members: ordered member ids of the old epoch (empty when starting from nothing).
        mapping: old rank -> new rank (None when starting from nothing).
        groups: ``WORLD`` -> the world group, plus ``"<partition>"`` -> this rank's sub-group of
            each layout partition. Empty for a leaving member.
    """

    epoch: int
    members: tuple[int, ...]
    rank: int | None
    old_epoch: int | None
    old_members: tuple[int, ...]
    mapping: RankMapping | None
    groups: Mapping[str, StatelessGroup]

    @property
    def world_size(self) -> int:
        return len(self.members)

    @property
    def group(self) -> StatelessGroup:
        """The new epoch's world group (this process must be a member of the new epoch)."""
        if WORLD not in self.groups:
            raise ValueError(f"this process is not a member of epoch {self.epoch}")
        return self.groups[WORLD]


def _check_members(members: Sequence[int]) -> tuple[int, ...]:
    if isinstance(members, str | bytes) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a sequence of member ids, got {type(members).__name__}")
    out = tuple(members)
    if not out:
        raise ValueError("members is empty: a world needs at least one member")
    for m in out:
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"members must hold int member ids, got {m!r}")
        if m < 0:
            raise ValueError(f"member ids must be >= 0, got {m}")
    if len(set(out)) != len(out):
        raise ValueError(f"members has duplicate member ids: {list(out)}")
    return out


def _teardown(groups: Sequence[StatelessGroup]) -> None:
    for g in groups:
        if g.failure is not None:
            g.abort()
        else:
            g.destroy()


class ElasticWorld:
    """This process's view of an elastic world: its member id, the current epoch and its groups.

    Args:
        rendezvous: the job's Rendezvous.
        member_id: this process's stable member id (>= 0).
        name: world name; groups are named ``<name>`` and ``<name>.<partition><index>``.
        backend: ``"gloo"`` or ``"nccl"``, for every group of the world.
        device: tensor device of the groups (default: see StatelessGroup).
        timeout_s: per-operation timeout of every group (> 0).
        build_timeout_s: how long a build waits for all members to arrive (> 0; default
            ``2 * timeout_s``, since survivors of a failure notice it up to ``timeout_s`` apart).
        layout: ``world_size -> GroupLayout`` giving the sub-groups of each epoch; default none.
        retire_join_s: bound on waiting for old groups' background teardown in :meth:`close`
            and :meth:`join_retired` (> 0).
    """

    def __init__(
        self,
        rendezvous: Rendezvous,
        member_id: int,
        *,
        name: str = "world",
        backend: str = "gloo",
        device: torch.device | str | None = None,
        timeout_s: float = 30.0,
        build_timeout_s: float | None = None,
        layout: Callable[[int], GroupLayout] | None = None,
        retire_join_s: float = 5.0,
    ) -> None:
        if not isinstance(rendezvous, Rendezvous):
            raise TypeError(f"rendezvous must be a Rendezvous, got {type(rendezvous).__name__}")
        if isinstance(member_id, bool) or not isinstance(member_id, int):
            raise TypeError(f"member_id must be an int, got {type(member_id).__name__}")
        if member_id < 0:
            raise ValueError(f"member_id must be >= 0, got {member_id}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        prefix_of(name)
        check_timeout(timeout_s)
        build_timeout_s = 2.0 * timeout_s if build_timeout_s is None else build_timeout_s
        check_timeout(build_timeout_s, "build_timeout_s")
        check_timeout(retire_join_s, "retire_join_s")
        from elastic_ep.groups.backend import Backend

        Backend.parse(backend)
        if device is not None:
            parse_device(device)
        self._rendezvous = rendezvous
        self._member_id = member_id
        self._name = name
        self._backend = backend
        self._device = device
        self._timeout_s = float(timeout_s)
        self._build_timeout_s = float(build_timeout_s)
        self._layout = layout if layout is not None else GroupLayout.none
        self._retire_join_s = float(retire_join_s)
        self._lock = threading.Lock()
        self._current: PendingEpoch | None = None
        self._pending: PendingEpoch | None = None
        self._highest_attempted = -1
        self._retiring: list[threading.Thread] = []

    # ---- state --------------------------------------------------------------------------
    @property
    def member_id(self) -> int:
        return self._member_id

    @property
    def name(self) -> str:
        return self._name

    @property
    def state(self) -> MemberState:
        return MemberState.OUTSIDE if self._current is None else MemberState.MEMBER

    @property
    def epoch(self) -> int | None:
        """The current epoch, or None when outside."""
        return None if self._current is None else self._current.epoch

    @property
    def members(self) -> tuple[int, ...]:
        """Ordered member ids of the current epoch (empty when outside)."""
        return () if self._current is None else self._current.members

    @property
    def rank(self) -> int:
        """This member's rank in the current epoch."""
        rank = self._require_current().rank
        assert rank is not None  # a current epoch always includes this member
        return rank

    @property
    def world_size(self) -> int:
        return self._require_current().world_size

    @property
    def group(self) -> StatelessGroup:
        """The current epoch's world group."""
        return self._require_current().group

    def subgroup(self, partition: str) -> StatelessGroup:
        """This member's group of layout ``partition`` in the current epoch."""
        groups = self._require_current().groups
        if partition == WORLD or partition not in groups:
            raise ValueError(f"no partition {partition!r} in the layout of epoch {self.epoch}")
        return groups[partition]

    @property
    def pending(self) -> PendingEpoch | None:
        """The prepared, not yet committed epoch, if any."""
        return self._pending

    # ---- transitions --------------------------------------------------------------------
    def start(self, members: Sequence[int], *, epoch: int = 0) -> None:
        """Form the world: every process in ``members`` calls this with the same arguments.

        Raises:
            ReconfigureError: a member did not arrive within ``build_timeout_s`` (nothing built).
        """
        if self._current is not None or self._pending is not None:
            raise ValueError(f"world {self._name!r} is already started (epoch {self.epoch})")
        pending = self._prepare(members, epoch, starting=True)
        self._switch(pending)

    def prepare(self, new_members: Sequence[int], *, epoch: int) -> PendingEpoch:
        """Build epoch ``epoch``'s groups as standby; the current groups keep working.

        Called by every member of ``new_members``: current members, and joiners (a fresh
        ElasticWorld that was told ``epoch`` and ``new_members``). Current members that are not
        in ``new_members`` (leavers) may call it too; they build nothing. The members check
        that they agree on the member list and on the epoch being replaced.

        Args:
            new_members: ordered member ids of the new epoch (rank = position).
            epoch: the new epoch's number, greater than every epoch this world has attempted.
        Returns:
            the pending epoch (pass it to :meth:`commit` or :meth:`discard`).
        Raises:
            ValueError/TypeError: bad arguments, or an uncommitted epoch is still pending.
            ReconfigureError: a member did not arrive, failed, or disagreed; the current
                groups are untouched.
        """
        return self._prepare(new_members, epoch, starting=False)

    def commit(self, pending: PendingEpoch) -> RankMapping:
        """Make ``pending`` the current epoch; tear the old groups down. Returns old -> new ranks.

        A member that is not in the new epoch is outside afterwards (it may join again later).
        Commit only once every member's prepare has succeeded (the coordinator knows); if any
        failed, every member discards instead.
        """
        with self._lock:
            mapping = pending.mapping
            if pending is not self._pending or mapping is None:
                raise ValueError("commit: this PendingEpoch is not the one prepared by this world")
        self._switch(pending)
        return mapping

    def reconfigure(self, new_members: Sequence[int], *, epoch: int) -> RankMapping:
        """prepare + commit."""
        return self.commit(self.prepare(new_members, epoch=epoch))

    def discard(self, pending: PendingEpoch) -> None:
        """Drop a prepared epoch (rollback): abort its groups; the current epoch stays."""
        with self._lock:
            if pending is not self._pending:
                raise ValueError("discard: this PendingEpoch is not the one prepared by this world")
            self._pending = None
        self._retire(list(pending.groups.values()))

    def abort(self) -> None:
        """Abort every group (current and pending) without waiting for peers; leave the world.

        Use it when giving up entirely; to recover from a failure, reconfigure instead.
        """
        with self._lock:
            held = [p for p in (self._current, self._pending) if p is not None]
            self._current = self._pending = None
        for p in held:
            for g in p.groups.values():
                g.abort()

    def close(self) -> None:
        """Release every group (current and pending) and leave the world. Idempotent."""
        with self._lock:
            held = [p for p in (self._current, self._pending) if p is not None]
            self._current = self._pending = None
        self._retire([g for p in held for g in p.groups.values()])
        self.join_retired()

    def join_retired(self, timeout_s: float | None = None) -> bool:
        """Wait (at most ``timeout_s``, default ``retire_join_s``) for old groups' teardown.

        Returns True when every teardown has finished.
        """
        deadline = time.monotonic() + (self._retire_join_s if timeout_s is None else timeout_s)
        with self._lock:
            threads = list(self._retiring)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._retiring = [t for t in self._retiring if t.is_alive()]
            return not self._retiring

    # ---- internals ----------------------------------------------------------------------
    def _retire(self, groups: list[StatelessGroup]) -> None:
        """Tear groups down on a daemon thread, off the caller's (blocking) path.

        A gloo teardown takes ~20 ms (socket and thread joins) and an NCCL one can hang, while a
        commit should take as little time as possible and never hang. :meth:`join_retired`
        waits for them, bounded.
        """
        if not groups:
            return
        thread = threading.Thread(
            target=_teardown, args=(groups,), name="elastic_ep-retire", daemon=True
        )
        thread.start()
        with self._lock:
            self._retiring = [t for t in self._retiring if t.is_alive()]
            self._retiring.append(thread)

    def _require_current(self) -> PendingEpoch:
        current = self._current
        if current is None or current.rank is None:
            raise ValueError(
                f"member {self._member_id} is not in a current epoch of {self._name!r}"
            )
        return current

    def _prepare(self, members: Sequence[int], epoch: int, *, starting: bool) -> PendingEpoch:
        new_members = _check_members(members)
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        with self._lock:
            if self._pending is not None:
                raise ValueError(
                    f"epoch {self._pending.epoch} is prepared but not committed: commit or discard it"
                )
            if epoch <= self._highest_attempted:
                raise ValueError(
                    f"epoch must be greater than {self._highest_attempted}, the highest epoch "
                    f"member {self._member_id} has already attempted (epochs are never reused)"
                )
            current = self._current
            if current is None and self._member_id not in new_members:
                raise ValueError(
                    f"member {self._member_id} is in no epoch and not in new_members {list(new_members)}"
                )
            self._highest_attempted = epoch
        old_members = () if current is None else current.members
        old_epoch = None if current is None else current.epoch
        if self._member_id not in new_members:
            pending = PendingEpoch(
                epoch, new_members, None, old_epoch, old_members,
                RankMapping.from_members(old_members, new_members), MappingProxyType({}),
            )  # fmt: skip
        else:
            pending = self._build(new_members, epoch, old_epoch, old_members, starting)
        with self._lock:
            self._pending = pending
        return pending

    def _build(
        self,
        new_members: tuple[int, ...],
        epoch: int,
        old_epoch: int | None,
        old_members: tuple[int, ...],
        starting: bool,
    ) -> PendingEpoch:
        rank = new_members.index(self._member_id)
        size = len(new_members)
        built: dict[str, StatelessGroup] = {}
        try:
            layout = self._layout(size)
            if not isinstance(layout, GroupLayout) or layout.world_size != size:
                raise ValueError(f"layout({size}) must return a GroupLayout for {size} ranks")
            built[WORLD] = self._group(self._name, epoch, rank, size)
            # Everyone checks that all agree on the members and on the epoch being replaced;
            # joiners learn the old member list from it.
            views = built[WORLD].all_gather_object(
                (self._member_id, new_members, old_epoch, old_members)
            )
            old_epoch, old_members = _agree(views, new_members, epoch, starting)
            for partition in layout.names:
                index, ranks = layout.group_of(partition, rank)
                built[partition] = self._group(
                    f"{self._name}.{partition}{index}", epoch, ranks.index(rank), len(ranks)
                )
        except (PeerFailure, ReconfigureError, ValueError, TypeError) as err:
            self._retire(list(built.values()))
            raise ReconfigureError(
                f"member {self._member_id}: building epoch {epoch} of {self._name!r} with members "
                f"{list(new_members)} failed{_missing(err, self._name, new_members)}: {err}"
            ) from err
        except BaseException:
            self._retire(list(built.values()))
            raise
        mapping = None if old_epoch is None else RankMapping.from_members(old_members, new_members)
        return PendingEpoch(
            epoch, new_members, rank, old_epoch, old_members, mapping, MappingProxyType(built)
        )

    def _group(self, name: str, epoch: int, rank: int, size: int) -> StatelessGroup:
        return StatelessGroup(
            self._rendezvous, name, epoch, rank, size, self._backend, self._device,
            self._timeout_s, build_timeout_s=self._build_timeout_s,
        )  # fmt: skip

    def _switch(self, pending: PendingEpoch) -> None:
        with self._lock:
            old = self._current
            self._current = pending if pending.rank is not None else None
            self._pending = None
        if old is not None:
            self._retire(list(old.groups.values()))


def _agree(
    views: list[tuple[int, tuple[int, ...], int | None, tuple[int, ...]]],
    new_members: tuple[int, ...],
    epoch: int,
    starting: bool,
) -> tuple[int | None, tuple[int, ...]]:
    """Check every member's view of a new epoch; return the (old epoch, old members) it replaces."""
    for rank, (member, members, _, _) in enumerate(views):
        if members != new_members:
            raise ReconfigureError(f"members disagree: rank {rank} has {list(members)}")
        if member != new_members[rank]:
            raise ReconfigureError(f"rank {rank} is member {member}, expected {new_members[rank]}")
    olds = {(e, m) for _, _, e, m in views if e is not None}
    if starting:
        if olds:
            raise ReconfigureError(f"cannot start: members are already in epochs {sorted(olds)}")
        return None, ()
    if len(olds) != 1:
        raise ReconfigureError(
            "no member is in a current epoch (use start())"
            if not olds
            else f"members replace different epochs: {sorted(olds)}"
        )
    ((old_epoch, old_members),) = olds
    if epoch <= old_epoch:
        raise ReconfigureError(f"epoch {epoch} is not greater than the current epoch {old_epoch}")
    return old_epoch, old_members


def _missing(err: BaseException, world: str, members: tuple[int, ...]) -> str:
    """Name the member behind a world-group PeerFailure (its ``member`` is a world rank)."""
    if isinstance(err, PeerFailure) and err.group == world and err.member is not None:
        return f" (member {members[err.member]} missing or failed)"
    return ""
