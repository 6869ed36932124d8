"""Draw the timeline (``--plot timeline.png``); needs matplotlib (``pip install 'elastic_ep[plot]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from elastic_ep.demo.timeline import TimelineRow


def plot_timeline(rows: Sequence[TimelineRow], path: Path) -> None:
    """Save three panels, one bar group per event: times, balancedness, requests.

    Raises ``ValueError`` if matplotlib is missing (nothing is written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install 'elastic_ep[plot]'") from err
    labels = [f"{i}: {row.event}" for i, row in enumerate(rows)]
    x = list(range(len(rows)))
    fig, (times, balance, requests) = plt.subplots(3, 1, figsize=(11, 10), sharex=True)

    width = 0.4
    times.bar(
        [i - width / 2 for i in x], [r.end_to_end_s or 0.0 for r in rows], width, label="end to end"
    )
    times.bar(
        [i + width / 2 for i in x], [r.blocking_s or 0.0 for r in rows], width, label="blocking"
    )
    times.set_ylabel("seconds")
    times.set_title("event time (request to serving again) and blocking time")
    times.legend()

    before = [r.balance_before if r.balance_before is not None else float("nan") for r in rows]
    after = [r.balance_after for r in rows]
    balance.plot(x, before, "o--", label="before")
    balance.plot(x, after, "o-", label="after")
    known = [b for b in before + after if b == b]  # drop NaN
    balance.set_ylim(max(0.0, min(known, default=0.0) - 0.05), 1.01)
    balance.set_ylabel("balancedness")
    balance.set_title("balancedness under the recorded load (mean / max rank load)")
    balance.legend()

    names = ("served", "drained", "held", "rejected", "lost")
    bar = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [float(getattr(r.requests, name)) for r in rows]
        requests.bar([i + (k - 2) * bar for i in x], values, bar, label=name)
    requests.set_ylabel("requests")
    requests.set_title("requests per event window (drained and held ones are among the served)")
    requests.legend()
    requests.set_xticks(x)
    requests.set_xticklabels(labels, rotation=20, ha="right")

    for i, row in enumerate(rows):
        mark = "pass" if row.passed else "FAIL"
        times.annotate(
            mark,
            (i, 0),
            textcoords="offset points",
            xytext=(0, -12),
            ha="center",
            fontsize=8,
            color="green" if row.passed else "red",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
