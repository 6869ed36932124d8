"""A small seeded MoE model: deterministic expert weights, a reference forward, rank-local builds.

Every weight is a pure function of ``(config.seed, layer, expert)``, so any rank can build (or,
after a failure, reload) any expert without communication: that is the demo's reload hook
(:func:`seeded_expert`). The reference forward holds every expert locally and uses no placement;
an :class:`EPMoEModel` built for any valid placement must match it within fp32 rounding.

Each block is ``x + moe(x)`` (a residual MoE stack, no attention or norms: routing and expert
parallelism are what is under test).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from elastic_ep.eplb.buffers import PlacementBuffers
from elastic_ep.eplb.placement import Placement
from elastic_ep.moe.dispatch import DispatchBackend
from elastic_ep.moe.experts import expert_mlp
from elastic_ep.moe.gating import topk_gating
from elastic_ep.moe.layer import EPMoELayer
from elastic_ep.moe.load_record import LoadRecord


@dataclass(frozen=True)
class MoEModelConfig:
    """Shape and seed of the model.

    Attributes:
        num_layers: L, MoE blocks.
        num_experts: E, logical experts per layer.
        hidden_size: H.
        intermediate_size: I, of each expert MLP.
        top_k: K, experts per token.
        seed: every weight derives from it.
        renormalize: renormalize the top-k gate weights (Mixtral) or not (DeepSeek-V2).
    """

    num_layers: int = 3
    num_experts: int = 16
    hidden_size: int = 64
    intermediate_size: int = 32
    top_k: int = 2
    seed: int = 0
    renormalize: bool = True

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "hidden_size", "intermediate_size", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


def _generator(config: MoEModelConfig, *key: int | str) -> torch.Generator:
    digest = hashlib.blake2b(repr((config.seed, *key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def seeded_expert(
    config: MoEModelConfig, layer: int, expert: int, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """The weights of logical ``expert`` of ``layer``: ``[w13, w2]``.

    Returns:
        float32 ``w13`` [2*I, H] and ``w2`` [H, I], identical on every process.
    """
    if not 0 <= layer < config.num_layers or not 0 <= expert < config.num_experts:
        raise ValueError(
            f"(layer, expert) = ({layer}, {expert}) outside {config.num_layers} layers x "
            f"{config.num_experts} experts"
        )
    h, i = config.hidden_size, config.intermediate_size
    gen = _generator(config, "expert", layer, expert)
    w13 = torch.randn(2 * i, h, generator=gen) / math.sqrt(h)
    w2 = torch.randn(h, i, generator=gen) / math.sqrt(i)
    return [w13.to(device), w2.to(device)]


def seeded_gate(
    config: MoEModelConfig, layer: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """float32 [E, H]: the router of ``layer``."""
    gen = _generator(config, "gate", layer)
    return torch.randn(config.num_experts, config.hidden_size, generator=gen).to(device)


def reference_moe(
    hidden: torch.Tensor,
    gate_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
) -> torch.Tensor:
    """Single-process MoE layer with every expert local (no placement, no communication).

    Args:
        hidden: [T, H]; gate_weight: [E, H]; w13: [E, 2*I, H]; w2: [E, H, I].
    Returns:
        [T, H] ``sum_k weight[t, k] * expert_{id[t, k]}(hidden[t])``, summed in float32.
    """
    weights, ids = topk_gating(hidden, gate_weight, top_k, renormalize=renormalize)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in ids.unique().tolist():
        token, choice = (ids == expert).nonzero(as_tuple=True)
        y = expert_mlp(hidden[token], w13[expert], w2[expert]).float()
        out.index_add_(0, token, y * weights[token, choice].unsqueeze(1))
    return out.to(hidden.dtype)


def reference_forward(config: MoEModelConfig, hidden: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, H]: the whole model on one process, every expert local."""
    x = hidden
    for layer in range(config.num_layers):
        experts = [seeded_expert(config, layer, e, x.device) for e in range(config.num_experts)]
        w13 = torch.stack([w[0] for w in experts])
        w2 = torch.stack([w[1] for w in experts])
        gate = seeded_gate(config, layer, x.device)
        x = x + reference_moe(x, gate, w13, w2, config.top_k, renormalize=config.renormalize)
    return x


class EPMoEModel(torch.nn.Module):
    """The rank-local model: one :class:`EPMoELayer` per MoE block, sharing placement buffers,
    dispatch backend and load record.

    Attributes:
        config: the model's shape and seed.
        placement_buffers: the fixed-address placement tables every layer routes through.
        load_record: per-step expert loads, or ``None`` when not recorded.
        layers: the MoE layers.
    """

    def __init__(
        self,
        config: MoEModelConfig,
        layers: list[EPMoELayer],
        buffers: PlacementBuffers,
        load_record: LoadRecord | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.placement_buffers = buffers
        self.load_record = load_record
        self.layers = torch.nn.ModuleList(layers)

    def _layer(self, index: int) -> EPMoELayer:
        layer = self.layers[index]
        assert isinstance(layer, EPMoELayer)
        return layer

    def set_backend(self, backend: DispatchBackend[Any] | None) -> None:
        """Bind the current epoch's dispatch backend to every layer."""
        for index in range(len(self.layers)):
            self._layer(index).set_backend(backend)

    def expert_weights(self) -> list[list[torch.Tensor]]:
        """Per layer ``[w13 [S_cap, 2*I, H], w2 [S_cap, H, I]]``: what the EPLB executor moves."""
        return [self._layer(i).expert_weights() for i in range(len(self.layers))]

    def reload(self, layer: int, expert: int) -> list[torch.Tensor]:
        """The EPLB executor's reload hook: ``[w13 [2*I, H], w2 [H, I]]`` of ``expert``, seeded,
        on the device and in the dtype of this model's weights."""
        return [
            src.to(dst.device, dst.dtype)
            for dst, src in zip(
                self._layer(layer).expert_weights(),
                seeded_expert(self.config, layer, expert),
                strict=True,
            )
        ]

    def load_expert_(self, layer: int, local_slot: int, expert: int) -> None:
        """Overwrite ``local_slot`` of ``layer`` with the seeded weights of ``expert`` (reload)."""
        for dst, src in zip(
            self._layer(layer).expert_weights(),
            seeded_expert(self.config, layer, expert),
            strict=True,
        ):
            dst[local_slot].copy_(src)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, H]; a collective over the EP group (every rank calls it, T may be 0)."""
        x = hidden
        for index in range(len(self.layers)):
            x = x + self._layer(index)(x)
        return x


def build_local_model(
    config: MoEModelConfig,
    placement: Placement,
    rank: int,
    buffers: PlacementBuffers,
    *,
    slots_capacity: int | None = None,
    load_record: LoadRecord | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> EPMoEModel:
    """The model of ``rank`` under ``placement``: its slots' seeded experts, empty slots zero.

    Does not touch ``buffers`` (write the placement with ``buffers.update_``) and binds no
    backend (``set_backend``).

    Args:
        slots_capacity: first dim of the weight tensors (default: ``placement.slots_per_rank``);
            larger lets later placements with more slots per rank reuse the same tensors.
        dtype: of the weights (and so of the activations the model takes).
    """
    if (placement.num_layers, placement.num_logical) != (config.num_layers, config.num_experts):
        raise ValueError(
            f"placement is {placement.num_layers} layers x {placement.num_logical} experts, "
            f"config {config.num_layers} x {config.num_experts}"
        )
    if not 0 <= rank < placement.num_ranks:
        raise ValueError(f"rank must be in [0, {placement.num_ranks}), got {rank}")
    per_rank = placement.slots_per_rank
    capacity = per_rank if slots_capacity is None else slots_capacity
    if capacity < per_rank:
        raise ValueError(f"slots_capacity={capacity} < {per_rank} slots per rank")
    h, i = config.hidden_size, config.intermediate_size
    local = placement.local_slots(rank)
    layers = []
    for layer in range(config.num_layers):
        w13 = torch.zeros(capacity, 2 * i, h, device=device, dtype=dtype)
        w2 = torch.zeros(capacity, h, i, device=device, dtype=dtype)
        for slot, expert in enumerate(local[layer].tolist()):
            if expert >= 0:
                w13[slot], w2[slot] = seeded_expert(config, layer, expert, device)
        layers.append(
            EPMoELayer(
                layer,
                seeded_gate(config, layer, device).to(dtype),
                w13,
                w2,
                config.top_k,
                buffers,
                renormalize=config.renormalize,
                load_record=load_record,
            )
        )
    return EPMoEModel(config, layers, buffers, load_record)
