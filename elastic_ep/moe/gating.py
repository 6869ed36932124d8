"""Top-k softmax gating: which logical experts each token goes to, and with what weight."""

from __future__ import annotations

import torch


def topk_gating(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each token to its ``top_k`` logical experts (Mixtral/DeepSeek-style softmax gate).

    Args:
        hidden: [T, H] token activations (any float dtype).
        gate_weight: [E, H] router weight, same dtype and device as ``hidden``.
        top_k: K, experts per token, ``1 <= K <= E``.
        renormalize: rescale the K weights of a token to sum to 1 (Mixtral); if False they are the
            raw softmax probabilities (DeepSeek-V2).
    Returns:
        (weights, ids): float32 [T, K] combine weights and int64 [T, K] logical expert ids, in
        descending weight order.
    """
    if hidden.dim() != 2 or gate_weight.dim() != 2 or hidden.shape[1] != gate_weight.shape[1]:
        raise ValueError(
            f"hidden must be [T, H] and gate_weight [E, H]; got {tuple(hidden.shape)} and "
            f"{tuple(gate_weight.shape)}"
        )
    num_experts = gate_weight.shape[0]
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}], got {top_k!r}")
    # Softmax in fp32 so the expert choice does not depend on the activation dtype's rounding.
    probs = torch.softmax((hidden @ gate_weight.t()).float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
