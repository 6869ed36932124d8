"""The executor's checks: every argument on this rank, then one all-reduce across the group.

Local checks come first (:func:`check_weights`: one sequence of contiguous tensors per layer, on
the group's device, with enough local slots), so bad input raises before any communication.
Then every rank hashes what must agree across the group into 56 bits (:func:`plan_digest`: both
placements, the rank mapping, dead ranks, node layout, buffer budget, overlap, every weight
kind's per-slot shape and dtype, and the group ranks) and :class:`PlanCheck` all-reduces
``(h, -h)`` with MAX: ``max(h) == h`` and ``max(-h) == -h`` hold on every rank iff all ranks have
the same ``h``. A mismatch raises on every rank before anything moved, and the group stays
usable; a peer that never joins raises ``PeerFailure`` within the group's timeout.

Every rank cuts the same chunks only if these agree, which is what makes peers post matching
transfers in the same order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from elastic_ep.eplb.exec_ranks import ProcessRanks
from elastic_ep.eplb.transfer_plan import TransferPlan
from elastic_ep.groups.stateless_group import StatelessGroup, WorkHandle

WeightKinds = tuple[tuple[tuple[tuple[int, ...], str], ...], ...]
"""``[layer][kind]``: one slot's shape and dtype name."""


def check_weights(
    plan: TransferPlan,
    weights: Sequence[Sequence[torch.Tensor]],
    process: ProcessRanks,
    device: torch.device,
) -> WeightKinds:
    """Validate ``weights``; returns the per-slot (shape, dtype) of every kind of every layer."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a sequence (per layer) of sequences of tensors")
    if len(weights) != plan.new.num_layers:
        raise ValueError(f"weights has {len(weights)} layers, the plan {plan.new.num_layers}")
    needed = max(
        plan.previous.slots_per_rank if process.old_rank is not None else 0,
        plan.new.slots_per_rank if process.new_rank is not None else 0,
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


def kind_bytes(weights: Sequence[Sequence[torch.Tensor]]) -> list[list[int]]:
    """``[layer][kind]``: bytes of one slot (no tensor views: ``t[0]`` costs ~2 us each)."""
    return [[math.prod(t.shape[1:]) * t.element_size() for t in layer] for layer in weights]


def plan_digest(
    plan: TransferPlan,
    buffer_bytes: int,
    overlap: bool,
    kinds: WeightKinds,
    process: ProcessRanks,
) -> int:
    """This rank's fingerprint of the plan, budget, options and weight shapes (56 bits)."""
    sha = hashlib.sha256()
    for placement in (plan.previous, plan.new):
        sha.update(placement.phy2log.numpy().tobytes())
        sha.update(repr((placement.num_logical, placement.num_ranks)).encode())
    sha.update(
        repr(
            (
                plan.rank_mapping,
                plan.dead_ranks,
                plan.nodes,
                buffer_bytes,
                overlap,
                kinds,
                process.ranks,
            )
        ).encode()
    )
    return int.from_bytes(sha.digest()[:7], "little")  # fits int64 with its negation


class PlanCheck:
    """One small all-reduce, so every rank can raise unless all have the same :func:`plan_digest`
    (``max(h) == h`` and ``max(-h) == -h`` on every rank iff all ranks have the same ``h``).

    Built ahead (in ``prepare_execution``), started before the first pack, awaited before
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
