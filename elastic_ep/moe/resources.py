"""The dispatch backend as an epoch-bound resource: rebuilt for every epoch by the registry.

At a commit the scaling agent builds every registered resource against the next epoch's groups
(while the old epoch still serves), installs the new set, then tears the old one down. Register
the MoE dispatch backend once; after each install, bind it to the model::

    register_dispatch_backend(resources, slots_per_rank=S, group_of=lambda ctx: ctx.groups)
    ...
    model.set_backend(resources.get(DISPATCH_RESOURCE))
"""

from __future__ import annotations

from collections.abc import Callable

from elastic_ep.moe.all_to_all import AllToAllBackend, AllToAllGroup
from elastic_ep.scaling.resources import EpochContext, EpochResources

DISPATCH_RESOURCE = "moe_dispatch"
"""Default registry name of the MoE dispatch backend."""


def _epoch_groups(ctx: EpochContext) -> AllToAllGroup:
    group: AllToAllGroup = ctx.groups
    return group


def register_dispatch_backend(
    resources: EpochResources,
    *,
    slots_per_rank: int | None = None,
    group_of: Callable[[EpochContext], AllToAllGroup] = _epoch_groups,
    name: str = DISPATCH_RESOURCE,
    depends_on: tuple[str, ...] = (),
) -> None:
    """Register an :class:`AllToAllBackend` built on each epoch's EP group.

    Args:
        resources: the engine's registry.
        slots_per_rank: S; default the epoch's ``ctx.placement.slots_per_rank``.
        group_of: picks the EP group from the epoch context (default ``ctx.groups`` itself).
        name: registry name.
        depends_on: resources that must be built first.
    Raises:
        ValueError: (at build time) neither ``slots_per_rank`` nor an epoch placement is known,
            or the group's rank/world size disagree with the epoch context.
    """

    def build(ctx: EpochContext) -> AllToAllBackend:
        per_rank = slots_per_rank
        if per_rank is None:
            if ctx.placement is None:
                raise ValueError(
                    f"epoch {ctx.epoch} has no placement; pass slots_per_rank to "
                    "register_dispatch_backend"
                )
            per_rank = ctx.placement.slots_per_rank
        group = group_of(ctx)
        if (group.rank, group.world_size) != (ctx.rank, ctx.world_size):
            raise ValueError(
                f"EP group is rank {group.rank} of {group.world_size}, epoch {ctx.epoch} context "
                f"says rank {ctx.rank} of {ctx.world_size}"
            )
        return AllToAllBackend.build(group, per_rank)

    resources.register(name, build, teardown=AllToAllBackend.destroy, depends_on=depends_on)
