"""How a rank learns that a peer died before its collectives time out.

The coordinator watches its rank processes and marks a dead one in the store: ``ctl/dead/<m>``,
then the n-th mark's member under ``ctl/dead/n/<n>``, ``n`` counted by ``ctl/dead/count``
(``ControlChannel.mark_dead``). A rank process learns of marks through one
:class:`DeathWatcher`: a thread blocked in a store ``wait`` for the next mark's key
(``ctl/dead/n/<seen + 1>``) on a client of its own. The server wakes it when the mark is made;
it reads the member (one ``get``) and publishes the set of dead members as one immutable
attribute. So a mark costs each rank two store calls, and nothing happens per step: while no
one dies a watcher re-issues its wait every :data:`WAKE_S` (one call), whatever the step rate
and the world size. Looking (:class:`DeadWatch`) reads that attribute, no store at all. Three
users look:

- :func:`wait_watching`: waits for an async gloo operation, failing with ``PeerFailure`` within
  :data:`DEAD_CHECK_S` of a mark (only the dead rank's neighbours see a broken connection; the
  others would wait for the group timeout, and a gloo abort does not wake a blocked wait);
- the pipelined poll's read of a vote not done yet (``poll.Voter.result``);
- :func:`watch_world`: a thread that aborts an NCCL world group whose member was marked, so the
  engine's collectives blocked on the dead rank fail at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta

from torch.distributed import Store, Work

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import StatelessGroup

DEAD_CHECK_S = 0.02
"""How often a waiting rank looks at its watcher's dead set (no store operation)."""

WAKE_S = 300.0
"""A watcher's store wait is re-issued this often while no one dies (one store call; torch logs
a warning for each wait that times out), and the thread ends this long after
:meth:`DeathWatcher.stop` at the latest (or when the store goes away: a daemon thread that
holds one idle connection until then)."""

_SPIN_S = 0.0001  # sleep between completion checks of an operation


class DeathWatcher:
    """The members the coordinator marked dead, kept current by a daemon thread that waits in
    the store for the next mark (see the module docstring).

    Args:
        store: a store client of the watcher's own (its waits block the client).

    Attributes:
        dead: members marked dead so far (a frozenset, replaced whole on each mark).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._stop = threading.Event()
        self._seen = int(store.add("ctl/dead/count", 0))
        marks = [f"ctl/dead/n/{n}" for n in range(1, self._seen + 1)]
        self.dead: frozenset[int] = frozenset(
            int(v) for v in (store.multi_get(marks) if marks else [])
        )
        self._thread = threading.Thread(target=self._run, name="elastic-deaths", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the thread end (at its next wake-up at the latest; it holds no lock)."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            key = f"ctl/dead/n/{self._seen + 1}"
            started = time.monotonic()
            try:
                self._store.wait([key], timedelta(seconds=WAKE_S))
                member = int(self._store.get(key))
            except RuntimeError:
                if time.monotonic() - started < WAKE_S / 2:
                    return  # not a timeout: the store is gone, the job is over
                continue
            self._seen += 1
            self.dead = self.dead | {member}


class DeadWatch:
    """Has a member of ``members`` been marked dead? Reads ``watcher.dead``, no store call."""

    def __init__(self, watcher: DeathWatcher, members: tuple[int, ...]) -> None:
        self._watcher = watcher
        self._members = members

    def dead(self) -> list[int]:
        """Members of this watch that were marked dead."""
        dead = self._watcher.dead
        return [m for m in self._members if m in dead] if dead else []


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
    watcher: DeathWatcher,
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
        if watch is None or current is not watched:
            watch, watched = DeadWatch(watcher, members), current
        if watch.dead():
            world.abort()  # the engine's collectives blocked on the dead rank fail now
            aborted = current
