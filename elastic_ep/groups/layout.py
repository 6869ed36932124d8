"""GroupLayout: which sub-groups (e.g. EP or TP groups) an epoch's world is split into.

A layout is a set of named *partitions* of the world's ranks. Each partition splits the ranks
``0..world_size-1`` into disjoint groups that together cover every rank, so each rank belongs to
exactly one group of each partition. Since the world size changes from epoch to epoch, an
ElasticWorld takes a function ``world_size -> GroupLayout`` rather than one fixed layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from elastic_ep.groups.rendezvous import prefix_of


@dataclass(frozen=True)
class GroupLayout:
    """Named partitions of a world of ``world_size`` ranks.

    Attributes:
        world_size: number of ranks the layout is for.
        partitions: partition name -> tuple of groups, each a tuple of world ranks (its order is
            the sub-group's rank order).
    """

    world_size: int
    partitions: Mapping[str, tuple[tuple[int, ...], ...]]

    def __post_init__(self) -> None:
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int):
            raise TypeError(f"world_size must be an int, got {type(self.world_size).__name__}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        frozen: dict[str, tuple[tuple[int, ...], ...]] = {}
        for name, groups in self.partitions.items():
            prefix_of(name)  # a partition name becomes part of a store key
            as_tuples = tuple(tuple(g) for g in groups)
            ranks = [r for g in as_tuples for r in g]
            if any(not g for g in as_tuples):
                raise ValueError(f"partition {name!r} has an empty group")
            if any(isinstance(r, bool) or not isinstance(r, int) for r in ranks):
                raise TypeError(f"partition {name!r} must hold int ranks, got {as_tuples}")
            if sorted(ranks) != list(range(self.world_size)):
                raise ValueError(
                    f"partition {name!r} must cover ranks 0..{self.world_size - 1} exactly once, "
                    f"got {as_tuples}"
                )
            frozen[name] = as_tuples
        object.__setattr__(self, "partitions", MappingProxyType(frozen))

    @classmethod
    def none(cls, world_size: int) -> GroupLayout:
        """No sub-groups: only the world group."""
        return cls(world_size, {})

    @classmethod
    def blocks(cls, world_size: int, **sizes: int) -> GroupLayout:
        """Contiguous blocks per partition, e.g. ``blocks(8, tp=2)``: tp groups (0,1) (2,3) ...

        Each size must divide ``world_size``.
        """
        partitions: dict[str, tuple[tuple[int, ...], ...]] = {}
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"block size of {name!r} must be an int >= 1, got {size!r}")
            if world_size % size:
                raise ValueError(
                    f"block size {size} of {name!r} does not divide world_size {world_size}"
                )
            partitions[name] = tuple(
                tuple(range(start, start + size)) for start in range(0, world_size, size)
            )
        return cls(world_size, partitions)

    def group_of(self, partition: str, rank: int) -> tuple[int, tuple[int, ...]]:
        """(index of the group, its ranks) that ``rank`` belongs to in ``partition``."""
        for index, ranks in enumerate(self.partitions[partition]):
            if rank in ranks:
                return index, ranks
        raise ValueError(f"rank {rank} is outside the world of {self.world_size}")

    @property
    def names(self) -> Sequence[str]:
        return tuple(self.partitions)
