"""Expert-parallel MoE: routing through the placement, load record, dispatch/combine, the layer.

Pieces, in the order a forward uses them:
- :func:`topk_gating`: logical top-k experts and weights per token;
- :func:`route_to_slots`: logical ids -> physical slots through the fixed-address placement
  tables (deterministic spread over replicas); :func:`route_and_record`: the same split and the
  load record in one Triton launch (the layer's path on CUDA);
- :class:`LoadRecord`: per-step load per slot folded to logical experts, a sliding window,
  aggregated over ranks for the planner;
- :class:`DispatchBackend` (interface) and :class:`AllToAllBackend` (torch ``all_to_all_single``):
  move tokens to their slots' ranks and back, rebuilt per epoch;
- :class:`EPMoELayer`, :class:`EPMoEModel`: the layer and a small seeded model with a reference
  forward, for tests and the demo.
"""

from elastic_ep.moe.all_to_all import AllToAllBackend, AllToAllGroup, AllToAllHandle
from elastic_ep.moe.dispatch import DispatchBackend, DispatchedTokens
from elastic_ep.moe.experts import expert_mlp, run_local_experts
from elastic_ep.moe.gating import topk_gating
from elastic_ep.moe.layer import EPMoELayer
from elastic_ep.moe.load_record import LoadRecord, SumReducer
from elastic_ep.moe.model import (
    EPMoEModel,
    MoEModelConfig,
    build_local_model,
    reference_forward,
    reference_moe,
    seeded_expert,
    seeded_gate,
)
from elastic_ep.moe.resources import DISPATCH_RESOURCE, register_dispatch_backend
from elastic_ep.moe.route_kernel import (
    new_route_scratch,
    route_and_record,
    running_counters,
    scratch_size,
)
from elastic_ep.moe.routing import count_slot_tokens_, route_to_slots

__all__ = [
    "DISPATCH_RESOURCE",
    "AllToAllBackend",
    "AllToAllGroup",
    "AllToAllHandle",
    "DispatchBackend",
    "DispatchedTokens",
    "EPMoELayer",
    "EPMoEModel",
    "LoadRecord",
    "MoEModelConfig",
    "SumReducer",
    "build_local_model",
    "count_slot_tokens_",
    "expert_mlp",
    "new_route_scratch",
    "reference_forward",
    "reference_moe",
    "register_dispatch_backend",
    "route_and_record",
    "route_to_slots",
    "run_local_experts",
    "running_counters",
    "scratch_size",
    "seeded_expert",
    "seeded_gate",
    "topk_gating",
]
