"""The elastic demo: ``python -m elastic_ep demo``.

A small seeded MoE model served by N real rank processes (gloo on CPU, or NCCL with one process
per GPU) under skewed synthetic traffic, while a controller plays an event script (rebalance,
scale up/down, kill a rank) and after every event checks the distributed forward against a
single-process reference. See docs/demo.md.

- :class:`DemoConfig`, :func:`parse_events`: settings and the event script;
- :func:`run_demo` -> :class:`DemoResult`: the run and its timeline;
- :func:`rank_main`: the rank process (the serving loop);
- :func:`plot_timeline`: the ``--plot`` figure.
"""

from elastic_ep.demo.config import (
    DemoConfig,
    DemoEvent,
    EventKind,
    TrafficConfig,
    default_script,
    parse_event,
    parse_events,
    world_sizes,
)
from elastic_ep.demo.controller import DemoController, DemoResult, run_demo
from elastic_ep.demo.plot import plot_timeline
from elastic_ep.demo.rank import rank_main
from elastic_ep.demo.timeline import Requests, TimelineRow, format_timeline

__all__ = [
    "DemoConfig",
    "DemoController",
    "DemoEvent",
    "DemoResult",
    "EventKind",
    "Requests",
    "TimelineRow",
    "TrafficConfig",
    "default_script",
    "format_timeline",
    "parse_event",
    "parse_events",
    "plot_timeline",
    "rank_main",
    "run_demo",
    "world_sizes",
]
