"""The demo's timeline: one row per event (and one for the start), printed as a table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_ep.demo.frontend import RequestCounts

PHASE_LABELS = {
    "preparing": "prep",
    "syncing_kv": "kv",
    "rebalancing": "move",
    "committing": "commit",
    "recovering": "recover",
}


@dataclass(frozen=True)
class Requests:
    """Requests of the whole job during one event window (since the previous check)."""

    served: int = 0
    drained: int = 0
    held: int = 0
    rejected: int = 0
    lost: int = 0

    @classmethod
    def between(cls, before: RequestCounts, after: RequestCounts) -> Requests:
        return cls(
            served=after.served - before.served,
            drained=after.drained - before.drained,
            held=after.held - before.held,
            rejected=after.rejected - before.rejected,
            lost=after.lost - before.lost,
        )


@dataclass(frozen=True)
class TimelineRow:
    """One event and the check after it.

    Attributes:
        event: what happened (``start``, ``rebalance``, ``scale 4->6 (drain)``, ``kill rank 1``).
        ok: the event completed (a rolled-back scale is not ok).
        error: why it did not.
        world: ranks after the event.
        end_to_end_s: from the request (or the kill) to serving again; ``None`` for the start.
        blocking_s: the longest time any rank could not run a forward step.
        phases: (phase, seconds) of the event, in order.
        experts_moved / bytes_moved: expert weights received over the network, and their bytes.
        reloaded: experts reloaded because every replica died.
        balance_before / balance_after: balancedness of the placement before and after the
            event under one load: the load the planner planned for (scale, rebalance), else the
            load recorded at the check after the event (``None`` before: nothing to compare).
        requests: the window's request counts.
        max_abs_diff: largest |distributed - reference| over the probe batch.
        atol: the threshold it must stay within.
    """

    event: str
    ok: bool
    error: str | None
    world: int
    end_to_end_s: float | None
    blocking_s: float | None
    phases: tuple[tuple[str, float], ...]
    experts_moved: int
    bytes_moved: int
    reloaded: int
    balance_before: float | None
    balance_after: float
    requests: Requests
    max_abs_diff: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.ok and self.max_abs_diff <= self.atol


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _phases(row: TimelineRow) -> str:
    return " ".join(f"{PHASE_LABELS.get(p, p)} {s:.3f}" for p, s in row.phases) or "-"


def human_bytes(count: float) -> str:
    """``1536 -> '1.5 kB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _moved(row: TimelineRow) -> str:
    if not row.experts_moved and not row.reloaded:
        return "-"
    text = f"{row.experts_moved} / {human_bytes(row.bytes_moved)}"
    return text + (f" +{row.reloaded} reloaded" if row.reloaded else "")


def _balance(row: TimelineRow) -> str:
    before = "-" if row.balance_before is None else f"{row.balance_before:.3f}"
    return f"{before} -> {row.balance_after:.3f}"


HEADER = (
    "#",
    "event",
    "ranks",
    "e2e s",
    "block s",
    "phases s",
    "moved experts / bytes",
    "balance",
    "served",
    "drained",
    "held",
    "rejected",
    "lost",
    "max|diff|",
    "check",
)


def format_timeline(rows: Sequence[TimelineRow]) -> str:
    """The rows as an aligned text table (a header line, a rule, one line per row)."""
    lines = [HEADER]
    for i, row in enumerate(rows):
        r = row.requests
        lines.append(
            (
                str(i),
                row.event,
                str(row.world),
                _seconds(row.end_to_end_s),
                _seconds(row.blocking_s),
                _phases(row),
                _moved(row),
                _balance(row),
                str(r.served),
                str(r.drained),
                str(r.held),
                str(r.rejected),
                str(r.lost),
                f"{row.max_abs_diff:.2e}",
                "pass" if row.passed else "FAIL",
            )
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(HEADER))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
