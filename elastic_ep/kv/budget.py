"""KV-cache budget agreement across the ranks of an epoch.

Every rank of a data/expert-parallel engine must allocate the same number of KV-cache blocks:
the scheduler admits work by a shared block count, so the budget is what the *tightest* rank can
hold. Hence a MIN all-reduce of each rank's free bytes. A joining rank has not profiled its
memory yet (and must not stall the scale event to do so): it passes ``None`` (or ``-1``), which
maps to int64 max, the identity of MIN, so it simply adopts the old members' budget.
"""

from __future__ import annotations

import numbers

import torch

from elastic_ep.errors import ElasticEPError
from elastic_ep.groups.stateless_group import StatelessGroup

UNKNOWN = -1
"""``local_bytes`` value of a rank that does not know its budget (a joiner); same as None."""

_INT64_MAX = torch.iinfo(torch.int64).max


class KVBudgetUnknownError(ElasticEPError, ValueError):
    """No rank of the group knew its KV budget, so there is nothing to agree on."""


def _local_value(local_bytes: int | None) -> int:
    """Validate ``local_bytes`` and map it to the all-reduce input (before any collective)."""
    if local_bytes is None:
        return _INT64_MAX
    # bool is an int in Python, and numpy bools are not ints but would pass int(); both are
    # almost surely a bug at the call site.
    if isinstance(local_bytes, bool) or not isinstance(local_bytes, numbers.Integral):
        raise TypeError(
            f"local_bytes must be an int number of bytes or None, got {type(local_bytes).__name__}"
        )
    value = int(local_bytes)
    if value == UNKNOWN:
        return _INT64_MAX
    if value < 0:
        raise ValueError(f"local_bytes must be >= 0, or -1/None for unknown; got {value}")
    if value >= _INT64_MAX:
        raise ValueError(f"local_bytes must be < 2**63 - 1, got {value}")
    return value


def sync_kv_budget(group: StatelessGroup, local_bytes: int | None) -> int:
    """Agree on the KV-cache budget of every rank of ``group``: the minimum known ``local_bytes``.

    Collective: every rank of ``group`` calls it. Bad ``local_bytes`` raises on that rank before
    any communication (so the caller must make every rank raise or none; validate locally first).

    Args:
        group: the epoch's group (e.g. the world or DP group); one int64 ``[1]`` all-reduce on
            ``group.device``.
        local_bytes: bytes this rank can give to the KV cache (int >= 0, Python or numpy
            integer), or None / -1 when unknown (a joining rank).
    Returns:
        the minimum over the ranks that know their budget (same on every rank).
    Raises:
        TypeError / ValueError: bad ``local_bytes`` (before any collective).
        KVBudgetUnknownError: no rank knew its budget (raised on every rank, after the collective).
        PeerFailure: a peer died or timed out.
    """
    if not isinstance(group, StatelessGroup):
        raise TypeError(f"group must be a StatelessGroup, got {type(group).__name__}")
    value = _local_value(local_bytes)
    t = torch.tensor([value], dtype=torch.int64, device=group.device)
    group.all_reduce(t, op=torch.distributed.ReduceOp.MIN, sync=True)
    budget = int(t.item())
    if budget == _INT64_MAX:
        raise KVBudgetUnknownError(
            f"no rank of group {group.name!r} epoch {group.epoch} knows its KV budget "
            f"(all {group.world_size} passed None/-1)"
        )
    return budget


def kv_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    """Number of whole KV blocks of ``block_bytes`` that fit in ``budget_bytes`` (floor)."""
    for name, value in (("budget_bytes", budget_bytes), ("block_bytes", block_bytes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    return int(budget_bytes) // int(block_bytes)
