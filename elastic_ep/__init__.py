"""elastic_ep: elastic expert parallelism for Mixture-of-Experts inference.

Change the number of GPUs of a serving MoE engine while it serves: stateless process groups that
are rebuilt in-process (:mod:`elastic_ep.groups`), KV-cache budget sync (:mod:`elastic_ep.kv`),
a movement-aware expert placement planner and the executor that moves expert weights
(:mod:`elastic_ep.eplb`).
"""

from elastic_ep.eplb import EMPTY, Placement, PlacementBuffers
from elastic_ep.errors import ElasticEPError, PeerFailure, ReconfigureError, ScalingInProgress
from elastic_ep.rank_mapping import RankMapping

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "ElasticEPError",
    "PeerFailure",
    "Placement",
    "PlacementBuffers",
    "RankMapping",
    "ReconfigureError",
    "ScalingInProgress",
    "__version__",
]
