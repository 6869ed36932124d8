"""Argument checks of :class:`~elastic_ep.groups.StatelessGroup` operations.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (a value out of range,
a tensor on another device, splits that do not add up) naming the argument, before anything is
posted, so a bad call leaves the group as it was. :func:`split_p2p` checks a batch of transfers
and splits off the transfers of a rank to itself, which are local copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_device(device: object) -> torch.device:
    """``torch.device(device)``, with ``TypeError``/``ValueError`` for what is not a device."""
    if not isinstance(device, torch.device | str):
        raise TypeError(f"device must be a torch.device or str, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r} is not a valid torch device: {err}") from None


def check_tensor(what: str, tensor: object, device: torch.device, group: str) -> None:
    """A contiguous tensor on the device type of ``group`` (which uses ``device``)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != device.type:
        raise ValueError(f"{what} is on {tensor.device}, but group {group!r} uses {device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


def check_peer(what: str, peer: object, world_size: int) -> None:
    """An int rank in ``0 .. world_size - 1``."""
    if isinstance(peer, bool) or not isinstance(peer, int):
        raise TypeError(f"{what} must be an int rank, got {type(peer).__name__}")
    if not 0 <= peer < world_size:
        raise ValueError(f"{what} = {peer} is outside the group of {world_size} ranks")


def check_splits(
    what: str, splits: list[int] | None, tensor: torch.Tensor, world_size: int
) -> list[int]:
    """Rows of ``tensor`` (dim 0) per rank: ``splits`` checked, or equal splits for None."""
    rows = tensor.shape[0] if tensor.dim() > 0 else 0
    if splits is None:
        if rows % world_size:
            raise ValueError(
                f"{what} is None but dim 0 ({rows}) is not divisible by world_size {world_size}"
            )
        return [rows // world_size] * world_size
    splits = [int(s) for s in splits]
    if len(splits) != world_size:
        raise ValueError(f"{what} has {len(splits)} entries, expected world_size {world_size}")
    if any(s < 0 for s in splits):
        raise ValueError(f"{what} has negative entries: {splits}")
    if sum(splits) != rows:
        raise ValueError(f"{what} sums to {sum(splits)} but dim 0 has {rows} rows")
    return splits


Pairs = list[tuple[torch.Tensor, int]]


def split_p2p(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    rank: int,
    world_size: int,
    device: torch.device,
    group: str,
) -> tuple[Pairs, Pairs, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Check a batch of ``(tensor, peer)`` transfers of ``rank``; return the sends and receives
    to other ranks and the ``(source, target)`` copies of the transfers to itself (the k-th
    send to itself goes to the k-th receive from itself: same shape and dtype)."""
    for kind, pairs in (("sends", sends), ("recvs", recvs)):
        for i, pair in enumerate(pairs):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise TypeError(f"{kind}[{i}] must be a (tensor, rank) pair, got {pair!r}")
            check_tensor(f"{kind}[{i}] tensor", pair[0], device, group)
            check_peer(f"{kind}[{i}] rank", pair[1], world_size)
    self_sends = [t for t, peer in sends if peer == rank]
    self_recvs = [t for t, peer in recvs if peer == rank]
    if len(self_sends) != len(self_recvs):
        raise ValueError(
            f"{len(self_sends)} sends to self but {len(self_recvs)} recvs from self (rank {rank})"
        )
    for i, (s, r) in enumerate(zip(self_sends, self_recvs, strict=True)):
        if s.shape != r.shape or s.dtype != r.dtype:
            raise ValueError(
                f"self transfer {i}: send {s.dtype}{tuple(s.shape)} != recv {r.dtype}{tuple(r.shape)}"
            )
    return (
        [(t, p) for t, p in sends if p != rank],
        [(t, p) for t, p in recvs if p != rank],
        list(zip(self_sends, self_recvs, strict=True)),
    )
