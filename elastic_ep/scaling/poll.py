"""The per-step vote behind :meth:`ElasticRank.poll`, taken off the serving thread.

Every rank must act on the same scale request at the same step, so each poll agrees on a few
flags (:class:`Vote`): the newest command the leader saw in the store, whether any rank is still
staging, failed, or has its groups built and waits for the transfer, whether the coordinator
aborted the running scale. Two ways to agree (:class:`PollMode`):

- ``BLOCKING``: one MAX all-reduce of the flags inside every poll, on the serving thread. Gloo's
  all-reduce is a ring: 2(R-1) message latencies, every step, plus the wait for the slowest rank.
- ``PIPELINED`` (default): the poll of step k *posts* its flags to a :class:`Voter` thread and
  returns; the poll of step k+1 *reads* the agreed result (normally complete: the forward step
  in between hid it) and acts on it. Every rank posts and reads the same votes in the same order
  (the first poll of an epoch only posts), so every rank still acts on the same result at the
  same step, one step later than a blocking poll would. The voter agrees by dissemination
  (:func:`dissemination_max`): in round i each rank sends to rank + 2^i and receives from
  rank - 2^i, ceil(log2 R) rounds of one message each, exact for MAX since MAX is idempotent.
  The leader's voter reads the store (newest command, abort mark) just before each vote, so the
  serving thread makes no store round trip either.

A dead rank: gloo fails the vote at once on the dead rank's partners; a poll that finds its vote
not done yet waits for it and, every :data:`DEAD_CHECK_S`, looks at the rank's death watcher
(:mod:`elastic_ep.scaling.deaths`: a thread the store wakes at each death mark, so looking costs
no store call) and fails with ``PeerFailure`` once a member of its epoch is marked dead, then
recovers. So a death is acted on at the first poll after the coordinator's mark, within
:data:`DEAD_CHECK_S` of it, as with the blocking poll (a vote posted before the death may still
complete: the poll after it fails).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
from torch.distributed import AllreduceOptions, ProcessGroup, ReduceOp, Work

from elastic_ep.errors import PeerFailure
from elastic_ep.groups import StatelessGroup
from elastic_ep.scaling.channel import ControlChannel
from elastic_ep.scaling.deaths import DEAD_CHECK_S, DeadWatch, wait_watching

VOTE_TAG = 0x5E1A0000
"""Base tag of the vote's point-to-point messages (clear of an engine's own small tags: on gloo
the control group is the world group the engine also uses)."""

NUM_FLAGS = 5


class PollMode(Enum):
    """Where :meth:`ElasticRank.poll` agrees on its flags (see the module docstring)."""

    BLOCKING = "blocking"
    PIPELINED = "pipelined"


@dataclass(frozen=True)
class Vote:
    """The flags every rank agreed on (MAX over ranks).

    Attributes:
        seq: the newest command number the leader saw in the store.
        busy: some rank still stages, or drains work in flight.
        failed: some rank failed or timed out staging.
        not_waiting: some rank has no groups built waiting for the transfer (0 = all have).
        aborted: the coordinator aborted the running scale.
    """

    seq: int = 0
    busy: bool = False
    failed: bool = False
    not_waiting: bool = True
    aborted: bool = False

    def to_tensor(self) -> torch.Tensor:
        """int64 [NUM_FLAGS]."""
        return torch.tensor(
            [self.seq, self.busy, self.failed, self.not_waiting, self.aborted], dtype=torch.int64
        )

    @classmethod
    def from_tensor(cls, flags: torch.Tensor) -> Vote:
        """From int64 [NUM_FLAGS]."""
        seq, busy, failed, not_waiting, aborted = (int(v) for v in flags.tolist())
        return cls(seq, bool(busy), bool(failed), bool(not_waiting), bool(aborted))


IDLE = Vote()
"""A rank's vote with no scale running (the leader's voter fills in the newest command)."""


def dissemination_partners(rank: int, world_size: int) -> list[tuple[int, int]]:
    """Per round, ``(send_to, receive_from)``: ``rank +- 2^i`` mod R, ceil(log2 R) rounds.

    After round i a rank holds the MAX over ranks ``rank - 2^(i+1) + 1 .. rank``, so after the
    last round over all R ranks (some counted twice, which MAX ignores).
    """
    rounds = math.ceil(math.log2(world_size)) if world_size > 1 else 0
    return [((rank + (1 << i)) % world_size, (rank - (1 << i)) % world_size) for i in range(rounds)]


def dissemination_max(
    pg: ProcessGroup,
    rank: int,
    world_size: int,
    flags: torch.Tensor,
    wait: Callable[[Work], None],
) -> None:
    """MAX of ``flags`` (int64 [n], CPU) over the group's ranks, in place, in ceil(log2 R)
    rounds of one send and one receive; ``wait(work)`` waits for each (and may raise)."""
    incoming = torch.empty_like(flags)
    for i, (to, frm) in enumerate(dissemination_partners(rank, world_size)):
        outgoing = flags.clone()
        send = pg.send([outgoing], to, VOTE_TAG + i)
        recv = pg.recv([incoming], frm, VOTE_TAG + i)
        wait(recv)
        wait(send)
        torch.maximum(flags, incoming, out=flags)


class Voter:
    """Runs one epoch's votes on a daemon thread, in the order they were posted.

    The hand-off to the serving thread is lock-free: :meth:`post` queues the vote and returns
    its number; the thread publishes each outcome as one immutable tuple,
    :attr:`finished` ``= (number, agreed Vote or None, error or None)``, replaced whole (a
    plain attribute assignment, atomic under the GIL), then notifies a condition for a poster
    that waits. A poll whose vote is done reads one attribute and compares one number; only a
    poll that finds its vote not done takes the condition (:meth:`result`). The serving thread
    makes no tensor, no store call and no event per vote.

    Each message waits in gloo (its completion cannot be polled: gloo marks point-to-point work
    complete only inside ``wait``), bounded by the group's timeout; the poster does not wait for
    a stuck vote (see :meth:`result`), and the thread ends with that timeout.

    Args:
        group: the epoch's gloo control group.
        channel: a store client of this thread's own (the leader reads the newest command and
            the abort mark of the running scale before each vote).

    Attributes:
        finished: ``(number, agreed, error)`` of the last vote done; ``(0, None, None)`` before.
        posted: the number of the last vote posted (0 before the first).
    """

    def __init__(self, group: StatelessGroup, channel: ControlChannel) -> None:
        self._group = group
        self._channel = channel
        self._done = threading.Condition()
        self._queue: queue.SimpleQueue[tuple[int, Vote, int] | None] = queue.SimpleQueue()
        self.finished: tuple[int, Vote | None, BaseException | None] = (0, None, None)
        self.posted = 0
        self._thread = threading.Thread(
            target=self._run, name=f"elastic-vote-{group.epoch}", daemon=True
        )
        self._thread.start()

    def post(self, mine: Vote, job_seq: int) -> int:
        """Queue this rank's vote and return its number; ``job_seq``: the command number of
        the running scale whose abort mark the leader looks up (0: none)."""
        self.posted = n = self.posted + 1
        self._queue.put((n, mine, job_seq))
        return n

    def result(self, n: int, watch: DeadWatch) -> Vote:
        """The agreed :class:`Vote` of vote ``n``, or ``PeerFailure``: the vote failed, a member
        of the epoch is marked dead (looked at every :data:`DEAD_CHECK_S` while this waits, no
        store call), or the vote is not done within the group's timeout of this wait."""
        group = self._group
        deadline = time.monotonic() + group.timeout_s
        while self.finished[0] != n:
            with self._done:
                if self._done.wait_for(lambda: self.finished[0] == n, DEAD_CHECK_S):
                    break
            dead = watch.dead()
            why = f"members {dead} were marked dead by the coordinator" if dead else None
            if why is None and time.monotonic() > deadline:
                why = f"no agreement within {group.timeout_s:g} s"
            if why is not None:
                raise PeerFailure(
                    f"vote on {group.name!r} epoch {group.epoch}: {why}",
                    group=group.name,
                    epoch=group.epoch,
                    member=dead[0] if dead else None,
                )
        _, agreed, error = self.finished
        if error is not None:
            raise error
        assert agreed is not None
        return agreed

    def close(self) -> None:
        """Stop the thread after the votes queued."""
        self._queue.put(None)

    def _finish(self, n: int, agreed: Vote | None, error: BaseException | None = None) -> None:
        self.finished = (n, agreed, error)
        with self._done:
            self._done.notify_all()

    def _run(self) -> None:
        group = self._group
        while (item := self._queue.get()) is not None:
            n, mine, job_seq = item
            try:
                flags = mine.to_tensor()
                if group.rank == 0:
                    channel = self._channel
                    flags[0] = channel.read_or(channel.latest_seq, 0)
                    if job_seq and channel.read_or(partial(channel.aborted, job_seq), False):
                        flags[4] = 1
                dissemination_max(group.process_group, group.rank, group.world_size, flags, _wait)
            except Exception as exc:
                self._finish(
                    n,
                    None,
                    PeerFailure(
                        f"vote on {group.name!r} epoch {group.epoch} failed: {exc}",
                        group=group.name,
                        epoch=group.epoch,
                    ),
                )
                return  # a failed vote ends the epoch's voting: the poster recovers
            self._finish(n, Vote.from_tensor(flags))


def _wait(work: Work) -> None:
    work.wait()  # gloo's timeout (the group's) bounds it


def blocking_vote(group: StatelessGroup, flags: torch.Tensor, watch: DeadWatch) -> None:
    """``PollMode.BLOCKING``: MAX all-reduce of ``flags`` (int64 [NUM_FLAGS]) on ``group``, in
    place, waited for on the calling thread (``PeerFailure`` on a failure or a death mark)."""
    opts = AllreduceOptions()
    opts.reduceOp = ReduceOp(ReduceOp.MAX)
    try:
        work = group.process_group.allreduce([flags], opts)
    except RuntimeError as err:
        raise PeerFailure(
            f"poll on group {group.name!r} epoch {group.epoch} failed: {err}",
            group=group.name,
            epoch=group.epoch,
        ) from err
    wait_watching(work, group, watch)
