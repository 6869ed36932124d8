"""Elastic scaling: change the number of ranks of a serving MoE engine, transactionally.

- :class:`ElasticCoordinator` (controller): validates :class:`ScaleRequest` s and
  :class:`RebalanceRequest` s (same members, new placement), launches joiners
  through a :class:`Launcher` (local processes, or Ray actors with :class:`RayLauncher`), follows the phases, reports :class:`ScaleStatus`.
- :class:`ElasticRank` (one per rank): ``poll()`` at safe points between forward steps (its vote
  pipelined off the serving thread, :class:`PollMode`); stages the next epoch in the background,
  commits in lockstep, recovers from a dead rank.
- :class:`TrafficGate` (drain | reject), :class:`EpochResources` (rebuilt at every commit),
  :class:`ControlServer` (``POST /scale``, ``POST /rebalance``, ``GET /status``).

See docs/scaling.md.
"""

from elastic_ep.scaling.channel import Command, CommandKind, RankReport
from elastic_ep.scaling.coordinator import ElasticCoordinator, ScaleConflict
from elastic_ep.scaling.gate import GateMode, TrafficGate
from elastic_ep.scaling.launcher import (
    CommandLauncher,
    CommandProcess,
    Launcher,
    LocalProcess,
    LocalProcessLauncher,
    RankHandle,
    RankRole,
    RankSpec,
)
from elastic_ep.scaling.phase import ScalePhase, can_transition, check_transition
from elastic_ep.scaling.poll import PollMode
from elastic_ep.scaling.rank_agent import ElasticRank
from elastic_ep.scaling.ray_launcher import RayLauncher, RayRank
from elastic_ep.scaling.request import RebalanceRequest, ScaleLimits, ScaleRequest
from elastic_ep.scaling.resources import EpochContext, EpochResources, ResourceError, ResourceSet
from elastic_ep.scaling.scale_job import Action
from elastic_ep.scaling.server import ControlServer
from elastic_ep.scaling.status import EventKind, ScaleStatus
from elastic_ep.scaling.transition import PlanFn, default_planner

__all__ = [
    "Action",
    "Command",
    "CommandKind",
    "CommandLauncher",
    "CommandProcess",
    "ControlServer",
    "ElasticCoordinator",
    "ElasticRank",
    "EpochContext",
    "EpochResources",
    "EventKind",
    "GateMode",
    "Launcher",
    "LocalProcess",
    "LocalProcessLauncher",
    "PlanFn",
    "PollMode",
    "RankHandle",
    "RankReport",
    "RankRole",
    "RankSpec",
    "RayLauncher",
    "RayRank",
    "RebalanceRequest",
    "ResourceError",
    "ResourceSet",
    "ScaleConflict",
    "ScaleLimits",
    "ScalePhase",
    "ScaleRequest",
    "ScaleStatus",
    "TrafficGate",
    "can_transition",
    "check_transition",
    "default_planner",
]
