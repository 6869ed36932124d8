"""Python objects over a StatelessGroup: pickled into uint8 tensors on the group's device.

:func:`all_gather_object` gathers the payload sizes first, then payloads padded to the largest;
:func:`broadcast_object` broadcasts the size, then the payload. Each step waits on the CPU
(``sync=True``), so a dead peer raises ``PeerFailure`` within the group's timeout on NCCL too.
Peers are trusted (pickle): they are the job's own processes.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from elastic_ep.groups.stateless_group import StatelessGroup


def to_tensor(obj: Any, device: torch.device) -> torch.Tensor:
    """``obj`` pickled: uint8 ``[n]`` on ``device``."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)


def from_tensor(buf: torch.Tensor) -> Any:
    """The object pickled in uint8 ``[n]`` ``buf``."""
    return pickle.loads(buf.cpu().numpy().tobytes())


def all_gather_object(group: StatelessGroup, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    device, world_size = group.device, group.world_size
    payload = to_tensor(obj, device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    group._run("all_gather_object", lambda pg: pg.allgather([sizes], [size]), sync=True)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    chunks = [torch.empty_like(padded) for _ in range(world_size)]
    group._run("all_gather_object", lambda pg: pg.allgather([chunks], [padded]), sync=True)
    return [from_tensor(c[:n]) for c, n in zip(chunks, lengths, strict=True)]


def broadcast_object(group: StatelessGroup, obj: Any, src: int) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``src`` checked by the caller)."""
    device, mine = group.device, group.rank == src
    payload = to_tensor(obj, device) if mine else None
    size = torch.tensor(
        [0 if payload is None else payload.numel()], dtype=torch.int64, device=device
    )
    group.broadcast_sync(size, src)
    buf = (
        payload
        if payload is not None
        else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    )
    group.broadcast_sync(buf, src)
    return obj if mine else from_tensor(buf)
