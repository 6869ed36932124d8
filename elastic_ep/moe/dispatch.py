"""The token dispatch/combine interface an EP MoE layer talks to.

A backend moves each (token, choice) pair to the rank that holds its physical slot, hands the
layer the tokens of every local slot, and brings the expert outputs back, weighted and summed per
token. A backend is bound to one epoch's group: it is built when the epoch starts and destroyed
when it ends (through the epoch-bound resources registry), never mutated across epochs.

Layout contract (what the layer sees): the received tokens of this rank, grouped by local slot
(slot 0's tokens first), with the host-side count of each slot. The torch ``all_to_all_single``
backend (:class:`~elastic_ep.moe.all_to_all.AllToAllBackend`) produces it directly; a pplx-kernels
or DeepEP backend, whose kernels deliver a per-expert padded or contiguous layout, adapts to it
in its own ``dispatch``/``combine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

HandleT = TypeVar("HandleT")


@dataclass(frozen=True, eq=False)
class DispatchedTokens:
    """The tokens this rank's experts must process for one layer.

    Attributes:
        hidden: [N, H] received tokens, grouped by local slot (slot 0's first), dtype of the
            dispatched activations.
        tokens_per_slot: S host ints, the length of each local slot's run; they sum to N.
    """

    hidden: torch.Tensor
    tokens_per_slot: tuple[int, ...]


class DispatchBackend(Protocol[HandleT]):
    """Dispatch/combine of one EP group for one epoch.

    Attributes:
        rank: this rank in the EP group.
        world_size: R, ranks in the EP group.
        slots_per_rank: S; physical slot ``p`` lives on rank ``p // S``, local slot ``p % S``.
    """

    rank: int
    world_size: int
    slots_per_rank: int

    def dispatch(
        self, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[DispatchedTokens, HandleT]:
        """Send every pair to its slot's rank (a collective: every rank calls it per layer).

        Args:
            hidden: [T, H] this rank's tokens (T may be 0).
            slot_ids: int64 [T, K] physical slot of each pair, in ``[0, R*S)``; -1 = drop the pair.
            weights: float [T, K] combine weight of each pair.
        Returns:
            the tokens for this rank's local slots, and a handle for :meth:`combine`.
        """
        ...

    def combine(self, expert_output: torch.Tensor, handle: HandleT) -> torch.Tensor:
        """Return expert outputs to their tokens and sum them, weighted (a collective).

        Args:
            expert_output: [N, H] outputs in the order of ``DispatchedTokens.hidden``.
            handle: what :meth:`dispatch` returned with those tokens.
        Returns:
            [T, H] ``sum_k weights[t, k] * expert_{slot_ids[t, k]}(hidden[t])``, dtype of hidden.
        """
        ...

    def destroy(self) -> None:
        """Release what the backend holds (buffers, kernel handles); idempotent."""
        ...
