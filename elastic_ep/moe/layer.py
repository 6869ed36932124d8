"""The expert-parallel MoE layer: gate, route through the placement, dispatch, experts, combine."""

from __future__ import annotations

from typing import Any

import torch

from elastic_ep.eplb.buffers import PlacementBuffers
from elastic_ep.moe.dispatch import DispatchBackend
from elastic_ep.moe.experts import run_local_experts
from elastic_ep.moe.gating import topk_gating
from elastic_ep.moe.load_record import LoadRecord
from elastic_ep.moe.route_kernel import new_route_scratch, route_and_record, triton_available
from elastic_ep.moe.routing import route_to_slots


class EPMoELayer(torch.nn.Module):
    """One MoE layer whose experts are spread over the ranks of an EP group.

    The layer reads its routing tables from the shared fixed-address ``PlacementBuffers`` (row
    ``layer``) at every forward, so a placement change is just ``buffers.update_`` plus moving the
    expert weights in place (what the EPLB executor does); a new epoch is a new backend
    (:meth:`set_backend`).

    Routing runs as one Triton launch on CUDA (:func:`~elastic_ep.moe.route_kernel.route_and_record`,
    which also records the load) and as torch ops elsewhere (``route_to_slots`` then
    ``LoadRecord.record_``); both split each expert's pairs over its replicas exactly.

    Buffers (weights are buffers, not parameters: this is inference):
        gate_weight: [E, H] router.
        w13: [S_cap, 2*I, H] gate/up projections of the local slots (``S_cap >= S``; slots
            beyond S, and empty slots, are never read).
        w2: [S_cap, H, I] down projections of the local slots.
        route_scratch: int32 [scratch_size(E)] the routing kernel's counters
            (:func:`~elastic_ep.moe.route_kernel.new_route_scratch`).
    """

    gate_weight: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    route_scratch: torch.Tensor

    def __init__(
        self,
        layer: int,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        buffers: PlacementBuffers,
        *,
        renormalize: bool = True,
        load_record: LoadRecord | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= layer < buffers.num_layers:
            raise ValueError(f"layer must be in [0, {buffers.num_layers}), got {layer}")
        num_experts, hidden = gate_weight.shape
        if num_experts != buffers.num_logical:
            raise ValueError(
                f"gate_weight has {num_experts} experts, buffers {buffers.num_logical}"
            )
        if w13.dim() != 3 or w13.shape[2] != hidden or w13.shape[1] % 2:
            raise ValueError(f"w13 must be [S_cap, 2*I, {hidden}], got {tuple(w13.shape)}")
        inter = w13.shape[1] // 2
        if w2.shape != (w13.shape[0], hidden, inter):
            raise ValueError(
                f"w2 must be [{w13.shape[0]}, {hidden}, {inter}], got {tuple(w2.shape)}"
            )
        if load_record is not None and load_record.capacity != buffers.capacity:
            raise ValueError(
                f"load_record capacity {load_record.capacity} != buffers capacity "
                f"{buffers.capacity}"
            )
        self.layer = layer
        self.top_k = top_k
        self.renormalize = renormalize
        self.placement_buffers = buffers
        self.load_record = load_record
        self.backend: DispatchBackend[Any] | None = None
        self.register_buffer("gate_weight", gate_weight)
        self.register_buffer("w13", w13)
        self.register_buffer("w2", w2)
        self.register_buffer(
            "route_scratch", new_route_scratch(num_experts, gate_weight.device), persistent=False
        )

    def set_backend(self, backend: DispatchBackend[Any] | None) -> None:
        """Bind the dispatch backend of the current epoch (``None`` unbinds)."""
        if backend is not None and backend.slots_per_rank > self.w13.shape[0]:
            raise ValueError(
                f"backend has {backend.slots_per_rank} slots per rank but this layer holds "
                f"weights for {self.w13.shape[0]}"
            )
        self.backend = backend

    def expert_weights(self) -> list[torch.Tensor]:
        """This layer's per-slot weight tensors ``[w13, w2]`` (first dim = local slots), the
        tensors the EPLB executor rewrites in place."""
        return [self.w13, self.w2]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]: the MoE output (no residual). A collective over the EP group."""
        backend = self.backend
        if backend is None:
            raise RuntimeError(f"MoE layer {self.layer} has no dispatch backend; call set_backend")
        tables = self.placement_buffers
        if tables.num_slots != backend.world_size * backend.slots_per_rank:
            raise RuntimeError(
                f"placement has {tables.num_slots} slots per layer but the backend's epoch "
                f"has {backend.world_size} ranks x {backend.slots_per_rank} slots"
            )
        weights, logical_ids = topk_gating(
            hidden, self.gate_weight, self.top_k, renormalize=self.renormalize
        )
        slot_ids = self._route(logical_ids, tables, backend.rank)
        tokens, handle = backend.dispatch(hidden, slot_ids, weights)
        expert_out = run_local_experts(tokens.hidden, tokens.tokens_per_slot, self.w13, self.w2)
        return backend.combine(expert_out, handle)

    def _route(
        self, logical_ids: torch.Tensor, tables: PlacementBuffers, rank: int
    ) -> torch.Tensor:
        """int64 [T, K] slots of ``logical_ids`` (int64 [T, K]), the load recorded if kept."""
        log2phy, logcnt = tables.log2phy[self.layer], tables.logcnt[self.layer]
        record = self.load_record
        if logical_ids.is_cuda and triton_available():
            if record is None:
                return route_and_record(
                    logical_ids, log2phy, logcnt, self.route_scratch, rank_offset=rank
                )
            return route_and_record(
                logical_ids,
                log2phy,
                logcnt,
                self.route_scratch,
                rank_offset=rank,
                slot_counts=record.slot_counts[self.layer],
                expert_counts=record.step_counts[self.layer],
                record_flag=record.recording,
            )
        slot_ids = route_to_slots(logical_ids, log2phy, logcnt, rank_offset=rank)
        if record is not None:
            record.record_(self.layer, slot_ids, tables.phy2log[self.layer])
        return slot_ids
