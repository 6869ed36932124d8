"""TransferPlan: which expert weights move where when one placement replaces another.

Pure and deterministic: every rank computes the same plan from the same inputs, with no
communication. Ranks are named in the numbering of the placement they belong to: senders by their
*old* rank (in ``previous``), receivers by their *new* rank (in ``new``); the executor maps both
onto the ranks of the group that runs the plan.

:func:`plan_transfers` plans every layer (:mod:`~elastic_ep.eplb.transfer_layers`, with numpy
over all layers at once). For each new rank whose slots change, every slot whose expert changes
needs that expert; the needs of one rank are merged per expert, so an expert crosses the network
at most once per receiver. Each need becomes one operation (:mod:`~elastic_ep.eplb.transfer_ops`):

* a :class:`LocalCopy` when the rank held the expert before (its source slot is the lowest one
  this layer leaves intact, else the lowest; ``staged`` when another local copy of the rank
  overwrites it);
* else a :class:`Transfer` from one live old rank that holds it. Senders are chosen greedily,
  scarce experts first (so their few holders are not already loaded by common ones), by: same
  node as the receiver when a :class:`NodeLayout` is given; fewest experts sent in this layer; a
  source slot this layer leaves intact; fewest sent in total; lowest rank;
* else a :class:`Reload` (every replica was on a dead rank).

So the network traffic is exactly ``new.transfers_from(previous, rank_mapping)`` minus reloads:
the minimum the two placements imply.

The layer's operations are then grouped into :class:`Step` s by their in-place hazards and all
layers' steps merged into one order (:mod:`~elastic_ep.eplb.transfer_steps`): every read of a
slot happens in the same or an earlier step than the write to it, so the executor may cut the
step sequence into chunks anywhere between steps. The arrays the executor reads on every call
(``step_experts``, ``op_table``, the sending and receiving ranks) are computed at plan time.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.transfer_layers import NodeLayout, layer_ops
from elastic_ep.eplb.transfer_ops import (
    LocalCopy,
    Op,
    OpTable,
    Reload,
    Step,
    Transfer,
    build_op_table,
)
from elastic_ep.eplb.transfer_steps import interleave_layers, layer_steps
from elastic_ep.rank_mapping import RankMapping

# The operation types (transfer_ops) and NodeLayout (transfer_layers) are re-exported here, where
# callers import them.
__all__ = [
    "LocalCopy",
    "NodeLayout",
    "Op",
    "OpTable",
    "Reload",
    "Step",
    "Transfer",
    "TransferPlan",
    "plan_transfers",
]


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """Every local copy, transfer and reload that turns ``previous`` into ``new``.

    Attributes:
        previous: placement before (old ranks).
        new: placement after (new ranks).
        rank_mapping: old rank -> new rank.
        dead_ranks: old ranks that cannot send (sorted); a subset of ``rank_mapping.removed``.
        nodes: node layout used to prefer same-node senders, or ``None``.
        steps: all operations, grouped and ordered as described in the module docstring.
    """

    previous: Placement
    new: Placement
    rank_mapping: RankMapping
    dead_ranks: tuple[int, ...]
    nodes: NodeLayout | None
    steps: tuple[Step, ...] = field(repr=False)

    @cached_property
    def transfers(self) -> tuple[Transfer, ...]:
        return tuple(op for s in self.steps for op in s.ops if isinstance(op, Transfer))

    @cached_property
    def local_copies(self) -> tuple[LocalCopy, ...]:
        return tuple(op for s in self.steps for op in s.ops if isinstance(op, LocalCopy))

    @cached_property
    def reloads(self) -> tuple[Reload, ...]:
        return tuple(op for s in self.steps for op in s.ops if isinstance(op, Reload))

    @cached_property
    def step_experts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per step, computed once per plan (the executor's chunking reads it on every call),
        sparse: a step touches few ranks, so its size grows with the steps, not steps x ranks.

        Returns:
            layer: int64 ``[steps]``, each step's layer.
            received: int64 ``[n, 3]``, rows ``(step, new rank, experts)``: experts of buffer
                the new rank needs in the step (``Step.buffer_experts``), by step then rank.
            sent: int64 ``[m, 3]``, rows ``(step, old rank, experts)``: experts the old rank
                sends in the step (``Step.sent_experts``), by step then rank.
        """
        n = len(self.steps)
        layer = np.fromiter((s.layer for s in self.steps), dtype=np.int64, count=n)
        received = [(i, r, c) for i, s in enumerate(self.steps) for r, c in s.buffer_experts]
        sent = [(i, r, c) for i, s in enumerate(self.steps) for r, c in s.sent_experts]
        return (
            layer,
            np.array(received, dtype=np.int64).reshape(-1, 3),
            np.array(sent, dtype=np.int64).reshape(-1, 3),
        )

    @cached_property
    def op_table(self) -> OpTable:
        """The plan's transfers and local copies as arrays (computed once per plan)."""
        return build_op_table(self.steps)

    @cached_property
    def sending_ranks(self) -> tuple[int, ...]:
        """Old ranks that send anything, ascending."""
        table = self.op_table
        return tuple(np.unique(table.src[table.transfer]).tolist())

    @cached_property
    def receiving_ranks(self) -> tuple[int, ...]:
        """New ranks that receive, copy or reload anything, ascending."""
        reloaded = np.array([op.rank for op in self.reloads], dtype=np.int64)
        return tuple(np.unique(np.concatenate([self.op_table.dst, reloaded])).tolist())

    def sends_per_old_rank(self) -> tuple[int, ...]:
        """Experts (over all layers) each old rank sends."""
        counts = [0] * self.rank_mapping.old_world_size
        for t in self.transfers:
            counts[t.src] += 1
        return tuple(counts)

    def receives_per_new_rank(self) -> tuple[int, ...]:
        """Experts (over all layers) each new rank receives over the network."""
        counts = [0] * self.rank_mapping.new_world_size
        for t in self.transfers:
            counts[t.dst] += 1
        return tuple(counts)

    def replan(self, dead_ranks: Iterable[int]) -> TransferPlan:
        """The same change planned again with another set of dead old ranks."""
        return plan_transfers(
            self.previous, self.new, self.rank_mapping, dead_ranks=dead_ranks, nodes=self.nodes
        )

    def __repr__(self) -> str:
        return (
            f"TransferPlan({self.previous.num_ranks}->{self.new.num_ranks} ranks, "
            f"layers={self.new.num_layers}, transfers={len(self.transfers)}, "
            f"local_copies={len(self.local_copies)}, reloads={len(self.reloads)}, "
            f"steps={len(self.steps)}, dead={list(self.dead_ranks)})"
        )


def plan_transfers(
    previous: Placement,
    new: Placement,
    rank_mapping: RankMapping | None = None,
    *,
    dead_ranks: Iterable[int] = (),
    nodes: NodeLayout | None = None,
) -> TransferPlan:
    """Plan the weight movement from ``previous`` to ``new``.

    Args:
        previous: placement of the old epoch (``previous.num_ranks`` old ranks).
        new: placement of the new epoch; same layers and logical experts.
        rank_mapping: old rank -> new rank; identity if ``None`` (then the rank counts must match).
        dead_ranks: old ranks that died: they send nothing. Each must be removed by the mapping.
        nodes: if given, a sender on the receiver's node is preferred over any other.
    Returns:
        the plan. Senders are chosen to spread the number of experts each old rank sends (per
        layer first, then in total), preferring a source slot that the layer does not overwrite.
    Raises:
        TypeError/ValueError: inputs of the wrong type or inconsistent shapes, naming the problem.
    """
    mapping = _check_inputs(previous, new, rank_mapping, nodes)
    dead = tuple(sorted(set(dead_ranks)))
    for r in dead:
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"dead_ranks must be ints, got {r!r}")
        if not 0 <= r < mapping.old_world_size or mapping.old_to_new[r] is not None:
            raise ValueError(
                f"dead rank {r} must be an old rank that rank_mapping removes "
                f"(removed: {list(mapping.removed)})"
            )
    with _without_cyclic_gc():
        ops = layer_ops(previous, new, mapping, dead, nodes)
        steps = interleave_layers(
            [layer_steps(layer, of_layer, mapping) for layer, of_layer in enumerate(ops)], mapping
        )
        plan = TransferPlan(previous, new, mapping, dead, nodes, steps)
        # Plan time: every execute of this plan reads them.
        plan.step_experts  # noqa: B018
        plan.op_table  # noqa: B018
        plan.sending_ranks  # noqa: B018
        plan.receiving_ranks  # noqa: B018
    return plan


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused: a plan allocates ~10 objects per op (ops, steps,
    tuples), none in a cycle, and at 1024 ranks the collector's passes over them took as long as
    the steps' grouping (0.3 of 0.4 s on a full reshuffle)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_inputs(
    previous: Placement, new: Placement, rank_mapping: RankMapping | None, nodes: NodeLayout | None
) -> RankMapping:
    for name, value in (("previous", previous), ("new", new)):
        if not isinstance(value, Placement):
            raise TypeError(f"{name} must be a Placement, got {type(value).__name__}")
    if (previous.num_layers, previous.num_logical) != (new.num_layers, new.num_logical):
        raise ValueError(
            f"previous has {previous.num_layers} layers x {previous.num_logical} experts, "
            f"new has {new.num_layers} x {new.num_logical}"
        )
    mapping = RankMapping.identity(previous.num_ranks) if rank_mapping is None else rank_mapping
    if not isinstance(mapping, RankMapping):
        raise TypeError(f"rank_mapping must be a RankMapping, got {type(mapping).__name__}")
    if mapping.old_world_size != previous.num_ranks or mapping.new_world_size != new.num_ranks:
        raise ValueError(
            f"rank_mapping maps {mapping.old_world_size} -> {mapping.new_world_size} ranks, "
            f"placements have {previous.num_ranks} -> {new.num_ranks}"
        )
    if nodes is not None:
        if not isinstance(nodes, NodeLayout):
            raise TypeError(f"nodes must be a NodeLayout, got {type(nodes).__name__}")
        if (
            len(nodes.old_rank_nodes) != previous.num_ranks
            or len(nodes.new_rank_nodes) != new.num_ranks
        ):
            raise ValueError(
                f"nodes has {len(nodes.old_rank_nodes)} old and {len(nodes.new_rank_nodes)} new "
                f"ranks, placements have {previous.num_ranks} and {new.num_ranks}"
            )
        for old, new_rank in enumerate(mapping.old_to_new):
            if new_rank is not None and nodes.old_rank_nodes[old] != nodes.new_rank_nodes[new_rank]:
                raise ValueError(
                    f"old rank {old} (new rank {new_rank}) is on node {nodes.old_rank_nodes[old]} "
                    f"before and node {nodes.new_rank_nodes[new_rank]} after"
                )
    return mapping
