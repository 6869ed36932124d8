"""Dispatch/combine on torch's own collectives: two ``all_to_all_single`` calls per direction.

Dispatch: every rank sorts its (token, choice) pairs by physical slot (rank-major, so the rows for
each destination rank are contiguous and, inside, ordered by local slot), exchanges the pair
count of every slot (one int64 all-to-all of R*S entries), then the token rows themselves (an
all-to-all with split sizes). The receiver knows from the count matrix which rows belong to which
(source rank, local slot) and regroups them slot-major for its experts. Combine runs the token
all-to-all in reverse and sums each pair's output into its token, weighted, on the source rank;
the combine weights never travel.

One row is sent per pair, so a token routed to two slots of the same rank travels twice (DeepEP
sends it once); that keeps the backend simple and exact. Works on gloo (CPU tensors) and NCCL
(CUDA tensors); the split sizes need one host sync per dispatch.

Failures: when a peer dies or the group is aborted under a dispatch/combine (the scaling agent's
watcher aborts an NCCL world whose member the coordinator marked dead), the collective, or the
host sync after it (``.tolist()``/``.cpu()`` surfaces an asynchronous NCCL/CUDA error), raises a
bare ``RuntimeError``. The backend turns it into :class:`~elastic_ep.errors.PeerFailure`, or
:class:`~elastic_ep.groups.GroupClosedError` when the group reports itself closed, so an engine
can catch both, recover and redo the step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from elastic_ep.errors import ElasticEPError, PeerFailure
from elastic_ep.groups import GroupClosedError
from elastic_ep.moe.dispatch import DispatchedTokens


class AllToAllGroup(Protocol):
    """What the backend needs of a group (``elastic_ep.groups.StatelessGroup`` has it).

    Optional attributes used to name a failure: ``name`` (str), ``epoch`` (int) and ``closed``
    (bool: the group was destroyed or aborted).
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: list[int] | None = None,
        input_split_sizes: list[int] | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class AllToAllHandle:
    """What :meth:`AllToAllBackend.combine` needs from the matching dispatch.

    Attributes:
        num_tokens: T, tokens of this rank.
        token_index: int64 [M] source token of each sent row, in send order.
        pair_weights: float32 [M] combine weight of each sent row.
        send_splits: R host ints, rows sent to each rank (sum M).
        recv_splits: R host ints, rows received from each rank (sum N).
        grouped_position: int64 [N] where each received row sits in the slot-grouped layout.
    """

    num_tokens: int
    token_index: torch.Tensor
    pair_weights: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    grouped_position: torch.Tensor


class AllToAllBackend:
    """:class:`~elastic_ep.moe.dispatch.DispatchBackend` over ``group.all_to_all_single``.

    Build one per epoch with :meth:`build`; it holds no buffers, so :meth:`destroy` only
    detaches it from the group (which its owner destroys).
    """

    def __init__(self, group: AllToAllGroup, slots_per_rank: int) -> None:
        if (
            not isinstance(slots_per_rank, int)
            or isinstance(slots_per_rank, bool)
            or slots_per_rank < 1
        ):
            raise ValueError(f"slots_per_rank must be a positive int, got {slots_per_rank!r}")
        self._group: AllToAllGroup | None = group
        self.rank = group.rank
        self.world_size = group.world_size
        self.slots_per_rank = slots_per_rank

    @classmethod
    def build(cls, group: AllToAllGroup, slots_per_rank: int) -> AllToAllBackend:
        """The backend for ``group`` (one epoch's EP group) with ``slots_per_rank`` slots a rank."""
        return cls(group, slots_per_rank)

    @property
    def group(self) -> AllToAllGroup:
        if self._group is None:
            raise RuntimeError(
                "this AllToAllBackend was destroyed; build one for the current epoch"
            )
        return self._group

    def destroy(self) -> None:
        self._group = None

    # ---- dispatch ----------------------------------------------------------------------------
    def dispatch(
        self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[DispatchedTokens, AllToAllHandle]:
        """See :meth:`DispatchBackend.dispatch`; raises ``ValueError`` on a slot id >= R*S
        before any collective."""
        group = self.group
        _check_inputs(hidden, slot_ids, weights)
        num_ranks, per_rank = self.world_size, self.slots_per_rank
        num_slots = num_ranks * per_rank
        top_k = slot_ids.shape[1]
        flat = slot_ids.reshape(-1)
        # Bucket of each pair: its slot, num_slots for dropped pairs (-1), num_slots + 1 if bad.
        bucket = torch.where(
            flat < 0, num_slots, torch.where(flat >= num_slots, num_slots + 1, flat)
        )
        counts = torch.zeros(num_slots + 2, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, bucket, torch.ones_like(bucket))
        with _peer_errors(group, "dispatch"):  # the sync may surface an earlier NCCL error
            counts_host = counts.tolist()
        if counts_host[-1]:
            raise ValueError(
                f"{counts_host[-1]} routed slot ids are >= {num_slots} (= {num_ranks} ranks x "
                f"{per_rank} slots); the routing tables do not match this backend's epoch"
            )
        send_counts = counts[:num_slots]
        recv_counts = torch.empty_like(send_counts)
        send_splits = _row_sums(counts_host[:num_slots], num_ranks, per_rank)
        order = torch.sort(bucket, stable=True).indices[: sum(send_splits)]
        token_index = order // top_k
        send_rows = hidden.index_select(0, token_index)
        with _peer_errors(group, "dispatch"):
            group.all_to_all_single(recv_counts, send_counts)
            recv_matrix = recv_counts.view(num_ranks, per_rank).cpu()
            recv_splits = tuple(int(x) for x in recv_matrix.sum(1))
            recv_rows = hidden.new_empty(sum(recv_splits), hidden.shape[1])
            group.all_to_all_single(recv_rows, send_rows, list(recv_splits), list(send_splits))

        position = _grouped_position(recv_matrix).to(hidden.device)
        grouped = torch.empty_like(recv_rows)
        grouped[position] = recv_rows
        handle = AllToAllHandle(
            num_tokens=hidden.shape[0],
            token_index=token_index,
            pair_weights=weights.reshape(-1).index_select(0, order).float(),
            send_splits=send_splits,
            recv_splits=recv_splits,
            grouped_position=position,
        )
        tokens = DispatchedTokens(grouped, tuple(int(x) for x in recv_matrix.sum(0)))
        return tokens, handle

    # ---- combine -----------------------------------------------------------------------------
    def combine(self, expert_output: torch.Tensor, handle: AllToAllHandle) -> torch.Tensor:
        """See :meth:`DispatchBackend.combine`. Sums in float32, returns the output dtype."""
        group = self.group
        received = sum(handle.recv_splits)
        if expert_output.dim() != 2 or expert_output.shape[0] != received:
            raise ValueError(
                f"expert_output must be [{received}, H] (the dispatched rows), got "
                f"{tuple(expert_output.shape)}"
            )
        in_recv_order = expert_output.index_select(0, handle.grouped_position)
        returned = expert_output.new_empty(int(handle.token_index.numel()), expert_output.shape[1])
        with _peer_errors(group, "combine"):
            group.all_to_all_single(
                returned, in_recv_order, list(handle.send_splits), list(handle.recv_splits)
            )
        out = torch.zeros(
            handle.num_tokens, expert_output.shape[1], dtype=torch.float32, device=returned.device
        )
        out.index_add_(0, handle.token_index, returned.float() * handle.pair_weights.unsqueeze(1))
        return out.to(expert_output.dtype)


@contextmanager
def _peer_errors(group: AllToAllGroup, op: str) -> Iterator[None]:
    """Raise a bare ``RuntimeError`` of the block as ``GroupClosedError`` (the group reports itself
    closed: aborted under us) or ``PeerFailure`` (a peer died or timed out). The library's own
    errors and out-of-memory (a local condition, not a peer's) pass unchanged."""
    try:
        yield
    except (ElasticEPError, torch.OutOfMemoryError):
        raise
    except RuntimeError as err:
        name = str(getattr(group, "name", "ep"))
        epoch = int(getattr(group, "epoch", -1))
        where = f"{op} on group {name!r} epoch {epoch} rank {group.rank}/{group.world_size}"
        if getattr(group, "closed", False):
            raise GroupClosedError(f"{where}: the group was closed under it ({err})") from err
        raise PeerFailure(f"{where} failed: {err}", group=name, epoch=epoch) from err


def _check_inputs(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {tuple(hidden.shape)}")
    if slot_ids.dtype != torch.int64 or slot_ids.dim() != 2 or slot_ids.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"slot_ids must be int64 [{hidden.shape[0]}, K], got {slot_ids.dtype} "
            f"{tuple(slot_ids.shape)}"
        )
    if weights.shape != slot_ids.shape or not weights.is_floating_point():
        raise ValueError(
            f"weights must be float {tuple(slot_ids.shape)}, got {weights.dtype} "
            f"{tuple(weights.shape)}"
        )


def _row_sums(flat_counts: Sequence[int], rows: int, cols: int) -> tuple[int, ...]:
    return tuple(sum(flat_counts[r * cols : (r + 1) * cols]) for r in range(rows))


def _grouped_position(recv_matrix: torch.Tensor) -> torch.Tensor:
    """int64 [N]: slot-major position of each row received in (source rank, local slot) order.

    Args:
        recv_matrix: int64 [R, S] (CPU) rows received from each source rank for each local slot.
    """
    num_ranks, per_rank = recv_matrix.shape
    flat = recv_matrix.reshape(-1)
    block = torch.repeat_interleave(torch.arange(flat.numel()), flat)
    recv_start = torch.cumsum(flat, 0) - flat
    slot_major = recv_matrix.t().reshape(-1)
    group_start = (
        (torch.cumsum(slot_major, 0) - slot_major).view(per_rank, num_ranks).t().reshape(-1)
    )
    within = torch.arange(block.numel()) - recv_start[block]
    return group_start[block] + within
