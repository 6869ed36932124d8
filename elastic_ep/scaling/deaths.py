"""How a rank learns that a peer died before its collectives time out.

The coordinator watches its rank processes and marks a dead one in the store (``ctl/dead/<m>``,
then bumps ``ctl/dead/count``). A rank looks with :class:`DeadWatch`: one read of the counter per
look, and a scan of its epoch's members' marks only at the first look and when the counter
moved, so a look costs O(1) store operations whatever the world size. Three users:

- :func:`wait_watching`: waits for an async gloo operation, failing with ``PeerFailure`` within
  :data:`DEAD_CHECK_S` of a mark (only the dead rank's neighbours see a broken connection; the
  others would wait for the group timeout, and a gloo abort does not wake a blocked wait);
- the pipelined poll's read of a vote not done yet (``poll.PendingVote.result``);
- :func:`watch_world`: a thread that aborts an NCCL world group whose member was marked, so the
  engine's collectives blocked on the dead rank fail at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from torch.distributed import Work

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import StatelessGroup
from elastic_ep.scaling.channel import ControlChannel

DEAD_CHECK_S = 0.02
"""How often a waiting rank looks at the death counter (one store read)."""

_SPIN_S = 0.0001  # sleep between completion checks of an operation


class DeadWatch:
    """Has a member of ``members`` been marked dead? One store read per check (the death
    counter), and a scan of the members' marks (one read each) at the first check and whenever
    the counter moved."""

    def __init__(self, channel: ControlChannel, members: tuple[int, ...]) -> None:
        self._channel = channel
        self._members = members
        self._seen: int | None = None

    def dead(self) -> list[int]:
        """Members marked dead; none while the store fails (see ``ControlChannel.read_or``)."""
        channel = self._channel
        count = channel.read_or(channel.dead_count, self._seen)
        if count == self._seen:
            return []
        none: list[int] = []
        found = channel.read_or(
            lambda: [m for m in self._members if channel.is_marked_dead(m)], none
        )
        if not found:
            self._seen = count  # the marks counted are of other epochs' members
        return found


def wait_watching(work: Work, group: StatelessGroup, watch: DeadWatch) -> None:
    """Wait for ``work`` (an async operation on ``group``); ``PeerFailure`` on gloo's error or
    timeout, or within :data:`DEAD_CHECK_S` of a death mark of one of ``watch``'s members."""
    next_check = time.monotonic() + DEAD_CHECK_S
    try:
        while not work.is_completed():
            now = time.monotonic()
            if now >= next_check:
                dead = watch.dead()
                if dead:
                    raise PeerFailure(
                        f"{group.name!r} epoch {group.epoch}: members {dead} were marked dead "
                        "by the coordinator",
                        group=group.name,
                        epoch=group.epoch,
                        member=dead[0],
                    )
                next_check = now + DEAD_CHECK_S
            time.sleep(_SPIN_S)
        work.wait()
    except RuntimeError as err:  # gloo's own error or timeout
        if isinstance(err, PeerFailure):
            raise
        raise PeerFailure(
            f"{group.name!r} epoch {group.epoch} failed: {err}",
            group=group.name,
            epoch=group.epoch,
        ) from err


def watch_world(
    channel: ControlChannel,
    serving: Callable[[], tuple[tuple[int, ...], StatelessGroup]],
    stop: threading.Event,
    interval_s: float,
) -> None:
    """Until ``stop``: abort the serving world group (``serving()``: its members and the group,
    read as one pair) once the coordinator marks one of its members dead."""
    aborted = None
    watched: tuple[tuple[int, ...], StatelessGroup] | None = None
    watch: DeadWatch | None = None
    while not stop.wait(interval_s):
        current = serving()
        if current is aborted:
            continue
        members, world = current
        try:
            if watch is None or current is not watched:
                watch, watched = DeadWatch(channel, members), current
            if watch.dead():
                world.abort()  # the engine's collectives blocked on the dead rank fail now
                aborted = current
        except RuntimeError:
            return  # the store is gone: the job is over
