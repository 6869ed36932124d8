"""Rebalance at a fixed world size: re-plan for the recorded load and move the weights in place.

The scaling package changes placements only when the set of ranks changes, so the demo runs a
same-size rebalance itself, at a safe point between forward steps, on every rank at once: rank 0
plans (movement-aware, from the serving placement), every rank gets the answer, the EPLB executor
moves the weights in place over the serving world group, and the fixed-address routing tables are
rewritten. It blocks serving for its whole duration (fine for a demo: it moves a few experts).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from elastic_ep.eplb import Placement, PlacementBuffers, execute, plan, plan_transfers
from elastic_ep.eplb.executor import ReloadHook
from elastic_ep.errors import ReconfigureError
from elastic_ep.groups import StatelessGroup


@dataclass(frozen=True)
class RebalanceResult:
    """What one rank saw of a rebalance.

    Attributes:
        placement: the new placement (the same on every rank).
        plan_s: planning on rank 0 plus the broadcast of its answer.
        move_s: the weight move (``execute``) and the routing-table update.
        bytes_received: expert-weight bytes this rank received.
        experts_moved: expert weights received over the network by all ranks.
    """

    placement: Placement
    plan_s: float
    move_s: float
    bytes_received: int
    experts_moved: int

    @property
    def blocking_s(self) -> float:
        return self.plan_s + self.move_s


def rebalance_in_place(
    world: StatelessGroup,
    control: StatelessGroup,
    previous: Placement,
    load: torch.Tensor,
    weights: Sequence[Sequence[torch.Tensor]],
    buffers: PlacementBuffers,
    *,
    reload: ReloadHook | None = None,
) -> RebalanceResult:
    """Plan for ``load`` and move ``weights`` to the new placement (collective over ``world``).

    Args:
        world: the serving group (moves the weights; gloo or NCCL).
        control: a gloo group of the same ranks (carries rank 0's plan).
        previous: the serving placement.
        load: float [L, E] expert load summed over the ranks (rank 0's is used).
        weights: ``weights[layer][kind]`` tensors ``[local_slots, ...]`` on ``world.device``.
        buffers: the routing tables, rewritten in place at the end.
        reload: the executor's hook (unused unless a plan loses an expert, which it cannot here).
    Raises:
        ReconfigureError: on every rank when rank 0's planner failed (nothing moved).
        PeerFailure: a peer died. The weights may then be partly moved while the routing
            tables and ``previous`` still describe the old placement, so a recovery from it
            would start from wrong weights; the demo never kills a rank during a rebalance.
    """
    start = time.perf_counter()
    answer: tuple[str, Any] = ("error", "")
    if control.rank == 0:
        try:
            answer = ("ok", plan(load, previous.num_ranks, previous.slots_per_rank, previous=previous))
        except (TypeError, ValueError) as exc:  # every rank must learn it, or the others hang
            answer = ("error", f"planning failed: {exc}")
    status, value = control.broadcast_object(answer, src=0)
    if status != "ok":
        raise ReconfigureError(str(value))
    new: Placement = value
    planned = time.perf_counter()
    stats = execute(plan_transfers(previous, new), weights, world, reload=reload)
    buffers.update_(new)
    return RebalanceResult(
        placement=new,
        plan_s=planned - start,
        move_s=time.perf_counter() - planned,
        bytes_received=stats.bytes_received,
        experts_moved=int(new.transfers_from(previous).sum()),
    )
