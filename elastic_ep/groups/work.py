"""Pending work of a :class:`~elastic_ep.groups.StatelessGroup`: a checked batch of
point-to-point transfers (:class:`P2PBatch`, from ``prepare_p2p``) and the handle of posted
work (:class:`WorkHandle`, from ``batch_p2p(..., async_op=True)``, ``P2PBatch.post`` or
``all_reduce(..., async_op=True)``).

A handle waits through its group, so a failure of the work breaks the group as a blocking
operation would (``PeerFailure`` naming the peer when the work had one). On NCCL the work is
stream-ordered: ``wait`` orders the current stream after it, and ``raise_if_failed`` (after an
event recorded behind the wait has completed) raises an error that torch's watchdog recorded on
the work without failing its stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed import ProcessGroup, Work

from elastic_ep.groups.backend import Backend


def post_p2p(
    pg: ProcessGroup,
    backend: Backend,
    device: torch.device,
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
) -> list[Work]:
    """Post sends and receives on ``pg`` (tag 0): one coalesced launch on NCCL, one work per
    transfer on gloo."""
    if backend is Backend.NCCL:
        pg._start_coalescing(device)
        for t, dst in sends:
            pg.send([t], dst, 0)
        for t, src in recvs:
            pg.recv([t], src, 0)
        return [pg._end_coalescing(device)]
    return [pg.send([t], dst, 0) for t, dst in sends] + [pg.recv([t], src, 0) for t, src in recvs]


if TYPE_CHECKING:
    from elastic_ep.groups.stateless_group import StatelessGroup


class P2PBatch:
    """A checked batch of point-to-point transfers, from :meth:`StatelessGroup.prepare_p2p`.

    :meth:`post` posts it (again on each call) and returns its :class:`WorkHandle`; the tensors
    are the ones given when prepared."""

    def __init__(
        self,
        group: StatelessGroup,
        sends: list[tuple[torch.Tensor, int]],
        recvs: list[tuple[torch.Tensor, int]],
        self_copies: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self._group, self._sends, self._recvs, self._self_copies = group, sends, recvs, self_copies
        self._peers = [p for _, p in sends] + [p for _, p in recvs]

    def post(self) -> WorkHandle:
        """Post the batch (transfers to this rank itself are copied first, in order)."""
        for source, target in self._self_copies:
            target.copy_(source)
        works = self._group._post_p2p(self._sends, self._recvs)
        return WorkHandle(self._group, "batch_p2p", works, self._peers)


class WorkHandle:
    """Pending work of one operation: a batch of transfers (``batch_p2p(..., async_op=True)``,
    :meth:`P2PBatch.post`) or a collective (``all_reduce(..., async_op=True)``).

    :meth:`wait` blocks until the work is done (on NCCL: until the current stream is ordered
    after it) and raises PeerFailure if a peer failed.
    """

    def __init__(self, group: StatelessGroup, op: str, works: list[Work], peers: list[int]) -> None:
        self._group = group
        self._op = op
        self._works = works
        self._posted = list(works)
        self._peer = peers[0] if len(set(peers)) == 1 else None

    def wait(self) -> None:
        works, self._works = self._works, []
        for work in works:
            self._group._wait(work, self._op, peer=self._peer, sync=False)

    def raise_if_failed(self) -> None:
        """Raise PeerFailure if the work failed; call it once it is done (on NCCL: once an event
        recorded after :meth:`wait` has completed). On NCCL, work that torch's watchdog ended for
        a dead peer lets its stream go on without an error: only the work records it. On gloo,
        :meth:`wait` completed the work and raised already (a gloo work cannot be waited twice).
        """
        if self._group._backend is not Backend.NCCL:
            return
        for work in self._posted:
            self._group._wait(work, self._op, peer=self._peer, sync=True)

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)
