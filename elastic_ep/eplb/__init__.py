"""Expert-parallel load balancing (EPLB): placements, planner and weight executor.

Glossary
--------
logical expert
    One of the E experts of a MoE layer, as the model defines it (id ``0 .. E-1``).
physical expert / slot
    A place on a rank that holds the weights of one logical expert. Each of the R ranks has S
    slots, so a layer has P = R * S physical slots, numbered rank-major (slot ``p`` is on rank
    ``p // S``). A slot can be empty (``-1``): that is what lets a placement shrink or grow
    inside buffers preallocated for the largest world size.
replica / redundant expert
    A logical expert placed in more than one slot. Tokens routed to it are spread over its
    replicas, which is how a hot expert's load is split across ranks. The replicas beyond the
    first are the redundant experts (P - E of them when no slot is empty).
placement
    The map slot -> logical expert for every layer (``phy2log`` [L, P]), the routing units of
    every slot (``units`` [L, P]) and its inverse (``log2phy`` [L, E, width], ``logcnt``
    [L, E]). See :class:`Placement`.
routing share
    The part of an expert's tokens one replica takes: ``units[p] / logcnt[e]``. All units 1 is
    the even split; the planner gives replicas on light ranks more (:mod:`.shares`).
rank mapping
    How the ranks of one epoch map onto the next (scale up, scale down, failure). See
    :class:`elastic_ep.RankMapping`.
home replica
    One replica of each expert that a fresh plan keeps below the ranks holding only spare
    replicas, so that a scale-down dropping the highest ranks loses no expert
    (:func:`essential_first`).
balancedness
    Mean rank load / max rank load of a layer (an expert's load split over its replicas by
    their routing shares), averaged over layers. 1.0 is perfect.
"""

from elastic_ep.eplb.buffers import PlacementBuffers
from elastic_ep.eplb.deepseek_compat import rebalance_experts
from elastic_ep.eplb.executor import (
    DEFAULT_BUFFER_BYTES,
    ExecutionStats,
    GroupRanks,
    LostExpertsError,
    Phase,
    PreparedExecution,
    execute,
    prepare_execution,
    required_buffer_bytes,
)
from elastic_ep.eplb.placement import EMPTY, Placement, log2phy_from_phy2log, max_units
from elastic_ep.eplb.planner import PlanReport, plan, plan_with_report
from elastic_ep.eplb.rank_order import essential_first
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.transfer_plan import (
    LocalCopy,
    NodeLayout,
    Reload,
    Step,
    Transfer,
    TransferPlan,
    plan_transfers,
)

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "EMPTY",
    "ExecutionStats",
    "GroupRanks",
    "LocalCopy",
    "LostExpertsError",
    "NodeLayout",
    "Phase",
    "Placement",
    "PlacementBuffers",
    "PlanReport",
    "PreparedExecution",
    "Reload",
    "Step",
    "Transfer",
    "TransferPlan",
    "essential_first",
    "execute",
    "log2phy_from_phy2log",
    "max_units",
    "plan",
    "plan_transfers",
    "plan_with_report",
    "prepare_execution",
    "rebalance_experts",
    "required_buffer_bytes",
    "solve_shares",
]
