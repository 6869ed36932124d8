"""What the demo's controller and ranks tell each other, under ``demo/`` on the job's TCPStore.

- ``demo/seq`` and ``demo/cmd/<seq>``: the controller's :class:`DemoCommand` s (probes).
  Rank 0 reads ``seq`` without blocking and the ranks agree on it in their step collective, so
  every rank runs a command at the same step.
- ``demo/reply/<seq>/<member>``: each rank's :class:`ProbeReply`.

Scale and rebalance requests go through the scaling package's coordinator, not these keys.
- ``demo/counts/<member>``: a rank's latest :class:`~elastic_ep.demo.frontend.RequestCounts`.

Values are pickled: the store is private to the job, whose processes trust each other.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any

import torch
from torch.distributed import Store

from elastic_ep.demo.frontend import RequestCounts
from elastic_ep.errors import ElasticEPError
from elastic_ep.scaling.channel import put


class CommandKind(Enum):
    PROBE = "probe"  # run the fixed probe batch and send the output back


@dataclass(frozen=True)
class DemoCommand:
    seq: int
    kind: CommandKind


@dataclass(frozen=True)
class ProbeReply:
    """One rank's part of a check.

    Attributes:
        member / rank / world_size / epoch: who answered, in which epoch.
        output: float32 [t, H] (CPU): the model's output for this rank's rows of the probe batch.
        phy2log: int64 [L, R*S] the serving placement (rank 0 only, else ``None``).
        load: float64 [L, E] the load window summed over the ranks (rank 0 only, else ``None``).
        counts: the rank's request counters.
    """

    member: int
    rank: int
    world_size: int
    epoch: int
    output: torch.Tensor
    phy2log: torch.Tensor | None
    load: torch.Tensor | None
    counts: RequestCounts


def _dump(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class DemoChannel:
    """Typed access to the ``demo/`` keys (every blocking read waits at most ``timeout_s``)."""

    def __init__(self, store: Store, timeout_s: float) -> None:
        self._store = store
        self._timeout = timedelta(seconds=timeout_s)

    # controller
    def publish(self, kind: CommandKind) -> DemoCommand:
        seq = int(self._store.add("demo/seq_reserved", 1))
        cmd = DemoCommand(seq, kind)
        put(self._store, f"demo/cmd/{seq}", _dump(cmd))
        self._store.add("demo/seq", seq - self.latest_seq())
        return cmd

    def replies(
        self, seq: int, members: tuple[int, ...], timeout_s: float
    ) -> dict[int, ProbeReply]:
        """Every member's reply to command ``seq``; raises ``ElasticEPError`` past ``timeout_s``."""
        keys = [f"demo/reply/{seq}/{m}" for m in members]
        try:
            self._store.wait(keys, timedelta(seconds=timeout_s))
        except Exception as exc:  # the store raises a bare RuntimeError/DistStoreError on timeout
            missing = [m for m, k in zip(members, keys, strict=True) if not self._store.check([k])]
            raise ElasticEPError(
                f"members {missing} did not answer command {seq} within {timeout_s:g} s"
            ) from exc
        return {m: pickle.loads(self._store.get(k)) for m, k in zip(members, keys, strict=True)}

    def counts(self, member: int) -> RequestCounts | None:
        key = f"demo/counts/{member}"
        if not self._store.check([key]):
            return None
        counts = pickle.loads(self._store.get(key))
        assert isinstance(counts, RequestCounts)
        return counts

    # ranks
    def latest_seq(self) -> int:
        """The newest command number, 0 if none (non-blocking)."""
        return int(self._store.add("demo/seq", 0))

    def command(self, seq: int) -> DemoCommand:
        self._store.wait([f"demo/cmd/{seq}"], self._timeout)
        cmd = pickle.loads(self._store.get(f"demo/cmd/{seq}"))
        if not isinstance(cmd, DemoCommand):
            raise TypeError(f"demo/cmd/{seq} holds {type(cmd).__name__}, not a DemoCommand")
        return cmd

    def reply(self, seq: int, member: int, reply: ProbeReply) -> None:
        put(self._store, f"demo/reply/{seq}/{member}", _dump(reply))

    def report_counts(self, member: int, counts: RequestCounts) -> None:
        put(self._store, f"demo/counts/{member}", _dump(counts))
