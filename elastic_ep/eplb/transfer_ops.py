"""The operations a :class:`~elastic_ep.eplb.transfer_plan.TransferPlan` is made of.

Per layer and receiving rank, each slot whose expert changes gets its weights from exactly one
operation:

* a :class:`LocalCopy` when the rank already held the expert (before the change): slot to slot
  on the rank, ``staged`` through the executor's buffer when another local copy of that rank
  overwrites its source slot;
* a :class:`Transfer` from one live old rank that held it: one expert over the network, however
  many of the receiver's slots want it (``dst_slots`` lists them all);
* a :class:`Reload` when no live old rank holds it (every replica was on a dead rank).

Ranks are named in the numbering of the placement they belong to: senders by their *old* rank,
receivers by their *new* rank; a local copy or a reload names its new rank.

A :class:`Step` is a group of one layer's operations that must run in the same chunk (see
:mod:`~elastic_ep.eplb.transfer_steps`); it carries the experts of buffer each receiving rank
needs and the experts each sender sends, which is all the executor's chunk cuts read.

:class:`OpTable` holds the same transfers and local copies as flat int64 arrays, one entry per
operation in plan order (reloads left out), built once per plan by :func:`build_op_table`: the
executor lays out every call's rows with numpy over it instead of walking the operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LocalCopy", "Op", "OpTable", "Reload", "Step", "Transfer", "build_op_table"]


@dataclass(frozen=True, slots=True)
class Transfer:
    """Send expert ``expert`` of ``layer`` from old rank ``src`` to new rank ``dst``.

    Attributes:
        src_slot: local slot index on the sender (``previous`` layout) holding the weights.
        dst_slots: local slot indices on the receiver (``new`` layout) to fill, ascending.
    """

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """New rank ``rank`` copies expert ``expert`` from its own old slot ``src_slot``.

    Attributes:
        dst_slots: local slots to fill, ascending.
        staged: the source slot is the destination of another local copy in this layer, so the
            executor copies it to its buffer first (this costs one expert of buffer). Unstaged
            copies run slot to slot before the chunk's other writes.
    """

    layer: int
    expert: int
    rank: int
    src_slot: int
    dst_slots: tuple[int, ...]
    staged: bool


@dataclass(frozen=True, slots=True)
class Reload:
    """No live old rank holds ``expert``: new rank ``rank`` reloads it (e.g. from disk)."""

    layer: int
    expert: int
    rank: int
    dst_slots: tuple[int, ...]


Op = Transfer | LocalCopy | Reload


@dataclass(frozen=True, slots=True)
class Step:
    """Operations of one layer that must run in the same chunk (a read/write cycle, or one op).

    Attributes:
        buffer_experts: ``(new_rank, n)`` pairs: experts of buffer the step needs on that
            receiving rank (one per transfer it receives and per staged local copy), ascending
            by rank, ranks needing none omitted.
        sent_experts: ``(old_rank, n)`` pairs: experts each sender sends in this step (the
            executor packs them in its buffer too), ascending by rank.
    """

    layer: int
    ops: tuple[Op, ...]
    buffer_experts: tuple[tuple[int, int], ...]
    sent_experts: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class OpTable:
    """A plan's transfers and local copies as arrays, in plan order (reloads are left out): what
    the executor lays out, with numpy, on every call.

    Attributes (int64 ``[ops]`` unless said otherwise):
        step: index of the op's step in ``TransferPlan.steps``.
        layer: the op's layer.
        transfer: bool ``[ops]``: a :class:`Transfer` (else a :class:`LocalCopy`).
        src: the sender's old rank, or for a local copy its new rank.
        src_slot: the slot read.
        dst: the receiver's new rank, or for a local copy its new rank.
        dst_slot: the first destination slot.
        staged: bool ``[ops]``: a local copy staged through the buffer.
        extra_op / extra_slot: int64 ``[extras]``: each further destination slot
            (``dst_slots[1:]``) and the index of its op.
    """

    step: np.ndarray
    layer: np.ndarray
    transfer: np.ndarray
    src: np.ndarray
    src_slot: np.ndarray
    dst: np.ndarray
    dst_slot: np.ndarray
    staged: np.ndarray
    extra_op: np.ndarray
    extra_slot: np.ndarray


def build_op_table(steps: Sequence[Step]) -> OpTable:
    """The transfers and local copies of ``steps`` as an :class:`OpTable`, in step order."""
    flat = [
        (i, op) for i, step in enumerate(steps) for op in step.ops if not isinstance(op, Reload)
    ]
    count = len(flat)

    def column(values: Iterable[int], dtype: type = np.int64) -> np.ndarray:
        return np.fromiter(values, dtype=dtype, count=count)

    sends = column((isinstance(op, Transfer) for _, op in flat), bool)
    extras = [(i, slot) for i, (_, op) in enumerate(flat) for slot in op.dst_slots[1:]]
    extra = np.array(extras, dtype=np.int64).reshape(-1, 2).T
    return OpTable(
        step=column(i for i, _ in flat),
        layer=column(op.layer for _, op in flat),
        transfer=sends,
        src=column(op.src if isinstance(op, Transfer) else op.rank for _, op in flat),
        src_slot=column(op.src_slot for _, op in flat),
        dst=column(op.dst if isinstance(op, Transfer) else op.rank for _, op in flat),
        dst_slot=column(op.dst_slots[0] for _, op in flat),
        staged=column((isinstance(op, LocalCopy) and op.staged for _, op in flat), bool),
        extra_op=extra[0],
        extra_slot=extra[1],
    )
