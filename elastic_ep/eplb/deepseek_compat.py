"""Drop-in replacement for DeepSeek EPLB's ``rebalance_experts``.

Same signature and output conventions as ``eplb.rebalance_experts`` of
https://github.com/deepseek-ai/EPLB, backed by :func:`elastic_ep.eplb.planner.plan`: the
hierarchical policy when ``num_groups`` is a multiple of ``num_nodes``, the global one otherwise.
Unlike DeepSeek's, no GPU ever holds two replicas of one expert.
"""

from __future__ import annotations

import torch

from elastic_ep.eplb.placement import log2phy_from_phy2log
from elastic_ep.eplb.planner import plan


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry point of the expert-parallel load balancer (DeepSeek's signature).

    Args:
        weight: [layers, num_logical_experts] load statistics of every logical expert (any real
            dtype, any device).
        num_replicas: number of physical experts P, a multiple of ``num_gpus``.
        num_groups: number of expert groups.
        num_nodes: number of server nodes (intra-node network faster).
        num_gpus: number of GPUs, a multiple of ``num_nodes``.

    Returns:
        physical_to_logical_map: int64 [layers, P], the logical expert of each replica.
        logical_to_physical_map: int64 [layers, E, P - E + 1], the replicas of each expert,
            -1 padded.
        expert_count: int64 [layers, E], replicas per logical expert.
    """
    if not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"num_gpus must be a positive int, got {num_gpus!r}")
    if not isinstance(num_replicas, int) or num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas!r} is not a multiple of num_gpus={num_gpus}")
    hierarchical = num_groups % num_nodes == 0 and num_nodes > 1
    placement = plan(
        weight,
        num_gpus,
        num_replicas // num_gpus,
        num_groups=num_groups if hierarchical else 1,
        num_nodes=num_nodes if hierarchical else 1,
        shares=False,  # DeepSeek's maps split each expert evenly over its replicas
    )
    logcnt = placement.logcnt
    log2phy = log2phy_from_phy2log(
        placement.phy2log, placement.num_logical, logcnt, num_replicas - placement.num_logical + 1
    )
    return placement.phy2log, log2phy, logcnt
