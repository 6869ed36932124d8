"""The arrival gate every rank of a StatelessGroup build passes before the backend connects.

A counter in the store (``gate``, under the group's key prefix) that every rank increments on
arrival; the last arrival opens the gate (``gate/open``), and a rank that waited its build
timeout in vain closes it for good: one atomic add of -2^40, so the count can never reach the
group size again. Either every rank passes and connects, or none does: a rank arriving after
its peers gave up fails at once instead of connecting to nobody (gloo would then wait several
times its timeout, NCCL forever). Each rank also claims ``arrived/<rank>`` first, so a second
build of the same ``(name, epoch)`` (whose stale keys would be read) is refused, and a failed
build can name the first rank that never arrived.

Store calls per rank: two ``add``, then one ``set`` (the last arrival) or one ``wait``.
"""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import Store

GATE_CLOSED = 1 << 40
"""Subtracted from the arrival count by a rank that gave up."""


def pass_arrival_gate(
    store: Store, rank: int, world_size: int, timeout_s: float, what: str
) -> BaseException | None:
    """Pass the gate of the build whose keys ``store`` holds; None once passed, else the error
    to report (no peer opened it within ``timeout_s``, or the peers gave up before this rank
    came). ``what`` names the group in errors.

    Raises:
        ValueError: this rank of the group was already built in this job.
    """
    if store.add(f"arrived/{rank}", 1) != 1:
        raise ValueError(
            f"group {what} rank {rank} was already built in this job: epochs must never be reused"
        )
    arrived = store.add("gate", 1)
    if arrived == world_size:
        store.set("gate/open", "1")
        return None
    error: BaseException = RuntimeError("a peer gave up waiting before this rank arrived")
    if arrived > 0:
        try:
            store.wait(["gate/open"], timedelta(seconds=timeout_s))
            return None
        except RuntimeError as err:
            error = err
        # Close the gate; if the last peer arrived just now, it passed: so does this rank.
        if store.add("gate", -GATE_CLOSED) + GATE_CLOSED == world_size:
            return None
    return error


def first_missing(store: Store, world_size: int) -> int | None:
    """The lowest rank that never claimed its arrival (None if all did or the store fails)."""
    try:
        return next((r for r in range(world_size) if not store.check([f"arrived/{r}"])), None)
    except RuntimeError:
        return None
