"""elastic_ep: elastic expert parallelism for Mixture-of-Experts inference.

Change the number of GPUs of a serving MoE engine while it serves:

- :mod:`elastic_ep.groups`: stateless process groups (gloo/NCCL) rebuilt in-process per epoch;
- :mod:`elastic_ep.kv`: KV-cache budget agreement (MIN all-reduce; joiners say "unknown");
- :mod:`elastic_ep.eplb`: placements with empty slots, a movement-aware elastic planner, and the
  executor that moves expert weights between ranks in place;
- :mod:`elastic_ep.moe`: routing through the placement, load record, dispatch/combine, EP MoE layer;
- :mod:`elastic_ep.scaling`: the coordinator and per-rank agent that compose the above into
  transactional scale-up, scale-down and failure recovery.

The most used names are re-exported here; the subpackages hold the rest.
"""

from elastic_ep.eplb import (
    EMPTY,
    ExecutionStats,
    Placement,
    PlacementBuffers,
    PlanReport,
    PreparedExecution,
    TransferPlan,
    execute,
    plan,
    plan_transfers,
    plan_with_report,
    prepare_execution,
    rebalance_experts,
)
from elastic_ep.errors import ElasticEPError, PeerFailure, ReconfigureError, ScalingInProgress
from elastic_ep.groups import (
    ElasticWorld,
    GroupClosedError,
    GroupLayout,
    Rendezvous,
    StatelessGroup,
)
from elastic_ep.kv import kv_blocks_for_budget, sync_kv_budget
from elastic_ep.rank_mapping import RankMapping
from elastic_ep.scaling import (
    Action,
    ControlServer,
    ElasticCoordinator,
    ElasticRank,
    EpochResources,
    EventKind,
    GateMode,
    LocalProcessLauncher,
    PollMode,
    RankRole,
    RankSpec,
    RayLauncher,
    RebalanceRequest,
    ScaleConflict,
    ScaleLimits,
    ScalePhase,
    ScaleRequest,
    ScaleStatus,
    TrafficGate,
)

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "Action",
    "ControlServer",
    "ElasticCoordinator",
    "ElasticEPError",
    "ElasticRank",
    "ElasticWorld",
    "EpochResources",
    "EventKind",
    "ExecutionStats",
    "GateMode",
    "GroupClosedError",
    "GroupLayout",
    "LocalProcessLauncher",
    "PeerFailure",
    "Placement",
    "PlacementBuffers",
    "PlanReport",
    "PollMode",
    "PreparedExecution",
    "RankMapping",
    "RankRole",
    "RankSpec",
    "RayLauncher",
    "RebalanceRequest",
    "ReconfigureError",
    "Rendezvous",
    "ScaleConflict",
    "ScaleLimits",
    "ScalePhase",
    "ScaleRequest",
    "ScaleStatus",
    "ScalingInProgress",
    "StatelessGroup",
    "TrafficGate",
    "TransferPlan",
    "__version__",
    "execute",
    "kv_blocks_for_budget",
    "plan",
    "plan_transfers",
    "plan_with_report",
    "prepare_execution",
    "rebalance_experts",
    "sync_kv_budget",
]
