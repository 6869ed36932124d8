"""RankMapping: how the ranks of one epoch map onto the ranks of the next.

A scale event (or a failure) changes the set of ranks. Every component that holds per-rank state
(process groups, expert placements, weight buffers) needs the same answer to "where did old rank
``r`` go?". This module gives it as one explicit frozen object instead of a list whose ``-1``
meaning depends on its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class RankMapping:
    """Old rank -> new rank for one epoch change.

    Attributes:
        old_to_new: one entry per old rank: its rank in the new epoch, or ``None`` if it was
            removed (left, or died).
        new_world_size: number of ranks in the new epoch. New ranks that no old rank maps to
            are the joined ranks.
    """

    old_to_new: tuple[int | None, ...]
    new_world_size: int

    def __post_init__(self) -> None:
        if not isinstance(self.new_world_size, int) or isinstance(self.new_world_size, bool):
            raise TypeError(
                f"new_world_size must be an int, got {type(self.new_world_size).__name__}"
            )
        if self.new_world_size < 1:
            raise ValueError(f"new_world_size must be >= 1, got {self.new_world_size}")
        if len(self.old_to_new) < 1:
            raise ValueError("old_to_new must have one entry per old rank (old world of 0)")
        object.__setattr__(self, "old_to_new", tuple(self.old_to_new))
        seen: set[int] = set()
        for old, new in enumerate(self.old_to_new):
            if new is None:
                continue
            if not isinstance(new, int) or isinstance(new, bool):
                raise TypeError(f"old_to_new[{old}] must be an int or None, got {new!r}")
            if not 0 <= new < self.new_world_size:
                raise ValueError(
                    f"old_to_new[{old}] = {new} is outside the new world of {self.new_world_size}"
                )
            if new in seen:
                raise ValueError(f"old_to_new maps two old ranks onto new rank {new}")
            seen.add(new)

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def identity(cls, world_size: int) -> RankMapping:
        """No change: rank ``r`` stays rank ``r``."""
        return cls(tuple(range(world_size)), world_size)

    @classmethod
    def resize(cls, old_world_size: int, new_world_size: int) -> RankMapping:
        """Scale up by appending ranks, or down by removing the highest ranks."""
        if old_world_size < 1:
            raise ValueError(f"old_world_size must be >= 1, got {old_world_size}")
        return cls(
            tuple(r if r < new_world_size else None for r in range(old_world_size)),
            new_world_size,
        )

    @classmethod
    def from_members(cls, old_members: Sequence[int], new_members: Sequence[int]) -> RankMapping:
        """Mapping implied by two ordered member-id lists (rank = position in the list)."""
        for name, members in (("old_members", old_members), ("new_members", new_members)):
            if len(set(members)) != len(members):
                raise ValueError(f"{name} has duplicate member ids: {list(members)}")
        new_pos = {m: i for i, m in enumerate(new_members)}
        return cls(tuple(new_pos.get(m) for m in old_members), len(new_members))

    @classmethod
    def without(cls, old_world_size: int, removed: Sequence[int]) -> RankMapping:
        """Drop the ``removed`` old ranks; survivors keep their order and are renumbered."""
        gone = set(removed)
        bad = [r for r in gone if not 0 <= r < old_world_size]
        if bad:
            raise ValueError(
                f"removed ranks {sorted(bad)} are outside the world of {old_world_size}"
            )
        mapping: list[int | None] = []
        nxt = 0
        for r in range(old_world_size):
            if r in gone:
                mapping.append(None)
            else:
                mapping.append(nxt)
                nxt += 1
        return cls(tuple(mapping), nxt)

    # ---- queries --------------------------------------------------------------------------
    @property
    def old_world_size(self) -> int:
        return len(self.old_to_new)

    @cached_property
    def new_to_old(self) -> tuple[int | None, ...]:
        """One entry per new rank: the old rank it was, or ``None`` for a joined rank."""
        inverse: list[int | None] = [None] * self.new_world_size
        for old, new in enumerate(self.old_to_new):
            if new is not None:
                inverse[new] = old
        return tuple(inverse)

    @property
    def removed(self) -> tuple[int, ...]:
        """Old ranks that are not in the new epoch."""
        return tuple(r for r, n in enumerate(self.old_to_new) if n is None)

    @property
    def joined(self) -> tuple[int, ...]:
        """New ranks that were not in the old epoch."""
        return tuple(r for r, o in enumerate(self.new_to_old) if o is None)

    @property
    def is_identity(self) -> bool:
        return self.old_world_size == self.new_world_size and all(
            n == r for r, n in enumerate(self.old_to_new)
        )

    def new_rank(self, old_rank: int) -> int | None:
        return self.old_to_new[old_rank]

    def old_rank(self, new_rank: int) -> int | None:
        return self.new_to_old[new_rank]

    def to_tensor(self) -> torch.Tensor:
        """int64 [old_world_size]: new rank of each old rank, ``-1`` where removed.

        This is the ``rank_mapping`` convention of vLLM's EPLB executor.
        """
        return torch.tensor([-1 if n is None else n for n in self.old_to_new], dtype=torch.int64)
