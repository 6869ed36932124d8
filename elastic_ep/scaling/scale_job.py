"""A rank's view of one scale or rebalance, and what a poll tells the engine.

:class:`ScaleJob` is created by the poll that starts a command on every rank; the staging thread
fills ``groups`` (when the transfer runs at a poll) and then ``staged``, or ``error``; the
serving thread reads them when it builds its vote and acts on the agreed one (transfer, commit
or roll back). :class:`Action` is what ``ElasticRank.poll`` returns.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum

from elastic_ep.groups import StatelessGroup
from elastic_ep.scaling.channel import Command
from elastic_ep.scaling.status import PhaseClock
from elastic_ep.scaling.transition import GroupRegistry, NextGroups, StagedEpoch


class Action(Enum):
    """What :meth:`ElasticRank.poll` tells the engine to do next."""

    SERVE = "serve"  # run the next forward step (a scale may be staging in the background)
    COMMITTED = "committed"  # a new epoch was installed: groups, placement, weights changed
    ROLLED_BACK = "rolled_back"  # a scale failed; the old epoch keeps serving
    RECOVERED = "recovered"  # a rank died; the survivors now serve a new epoch
    LEAVE = "leave"  # this rank was scaled away: stop serving and return
    STOP = "stop"  # the job is shutting down


@dataclass
class ScaleJob:
    """One scale or rebalance as a rank runs it: the command, deadlines, the staging thread and
    what it produced (groups to transfer over, the staged epoch, or an error)."""

    command: Command
    clock: PhaseClock
    deadline: float
    drain_deadline: float
    registry: GroupRegistry = field(default_factory=GroupRegistry)
    groups: NextGroups | None = None  # built, when the serving thread runs the transfer
    transfer_s: float = 0.0  # the serving thread's time in the transfer poll
    thread: threading.Thread | None = None
    staged: StagedEpoch | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.staged is not None or self.error is not None


def destroy_all(groups: list[StatelessGroup]) -> None:
    for g in groups:
        g.destroy()
