"""The expert MLP (SiLU-gated, as in Mixtral and DeepSeek) and running it over a rank's slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def expert_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: ``w2 @ (silu(w1 @ x) * (w3 @ x))``.

    Args:
        x: [N, H] tokens.
        w13: [2*I, H] gate projection (rows ``:I``) stacked on the up projection (rows ``I:``).
        w2: [H, I] down projection.
    Returns:
        [N, H], dtype of ``x``.
    """
    gate_up = x @ w13.t()
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.t()


def run_local_experts(
    tokens: torch.Tensor,
    tokens_per_slot: Sequence[int],
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """Apply each local slot's expert to its contiguous run of tokens.

    Args:
        tokens: [N, H] tokens grouped by local slot (slot 0's first), ``N = sum(tokens_per_slot)``.
        tokens_per_slot: S host ints, tokens for each local slot.
        w13: [S_cap, 2*I, H] local slots' gate/up weights, ``S_cap >= S``.
        w2: [S_cap, H, I] local slots' down weights.
    Returns:
        [N, H] expert outputs in the order of ``tokens``.
    """
    if len(tokens_per_slot) > w13.shape[0]:
        raise ValueError(
            f"{len(tokens_per_slot)} local slots but expert weights hold only {w13.shape[0]}"
        )
    out = torch.empty_like(tokens)
    start = 0
    for slot, count in enumerate(tokens_per_slot):
        if count:
            end = start + count
            out[start:end] = expert_mlp(tokens[start:end], w13[slot], w2[slot])
            start = end
    return out
