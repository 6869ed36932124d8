"""Where a plan's ranks sit in the group that runs it.

A :class:`~elastic_ep.eplb.transfer_plan.TransferPlan` names senders by their old rank and
receivers by their new rank. The group that runs it has a numbering of its own: the new epoch's
(scale-up, failure: old ranks reach it through the rank mapping), the old epoch's (scale-down:
new ranks reach it through the mapping), or any other the caller gives. :class:`GroupRanks` holds
that numbering for every old and new rank; :class:`ProcessRanks` is one process's view of it
(its group rank, old rank and new rank), checked against the plan so that every sender and
receiver is a member of the group and an old rank and its new rank are the same process.

Pure (no communication, no device work); the chunking (:mod:`~elastic_ep.eplb.exec_chunks`) and
the layout (:mod:`~elastic_ep.eplb.exec_layout`) read these, the executor builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic_ep.eplb.transfer_ops import Transfer
from elastic_ep.eplb.transfer_plan import TransferPlan
from elastic_ep.groups.stateless_group import StatelessGroup
from elastic_ep.rank_mapping import RankMapping


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
class ProcessRanks:
    """Where this process sits: its group rank, old rank and new rank, and everyone's.

    Attributes:
        ranks: every old and new rank's group rank.
        group_rank / world_size: this process's rank in the group, and the group's size.
        old_rank / new_rank: this process's rank in ``previous`` / ``new`` (``None`` if not one).
    """

    ranks: GroupRanks
    group_rank: int
    world_size: int
    old_rank: int | None
    new_rank: int | None

    @classmethod
    def resolve(
        cls, plan: TransferPlan, group: StatelessGroup, ranks: GroupRanks | None
    ) -> ProcessRanks:
        """This process's ranks in ``group``, ``ranks`` (default: by the group's size, see
        :meth:`GroupRanks.for_world_size`) checked against the plan.

        Raises:
            TypeError/ValueError: ``ranks`` does not fit the plan or the group, or a sender or
                receiver of the plan is not in the group.
        """
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
        size = group.world_size
        for what, table in (("old", ranks.old), ("new", ranks.new)):
            members = [g for g in table if g is not None]
            if any(not 0 <= g < size for g in members) or len(set(members)) != len(members):
                raise ValueError(
                    f"ranks.{what} = {list(table)} is not a set of distinct ranks of a group of {size}"
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
