"""Skewed synthetic tokens: Zipf-distributed expert popularity through a biased gate input.

Each layer's gate is a seeded matrix ``[E, H]``. A token picks one target expert per layer from a
Zipf law (a seeded permutation per layer decides which experts are hot) and its hidden vector is
Gaussian noise (std ``noise``) plus ``bias`` times the sum of the targets' unit gate rows. Only
the ratio of the two sets the skew; their size is kept small because the residual stack of gated
MLPs grows large inputs quadratically, and fp32 rounding error with them. Gate rows are nearly orthogonal,
so each layer's router mostly picks that layer's target: the load is skewed the same way on every
rank, and a placement planned for uniform load is visibly unbalanced until the demo rebalances.
"""

from __future__ import annotations

import torch

from elastic_ep.moe import MoEModelConfig, seeded_gate

PROBE_SEED = 20_260_000
"""Seed of the probe batch's stream (rank streams are seeded by member id, never this)."""


def zipf_weights(num_experts: int, s: float, seed: int, layer: int) -> torch.Tensor:
    """float64 [E]: probabilities ``∝ 1 / k**s`` for popularity rank ``k``, permuted per layer."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not s >= 0:
        raise ValueError(f"the Zipf exponent must be >= 0, got {s!r}")
    ranks = torch.arange(1, num_experts + 1, dtype=torch.float64)
    weights = ranks.pow(-s)
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed * 1009 + layer))
    return (weights / weights.sum())[perm.argsort()]


class SkewedTokens:
    """A stream of hidden vectors ``[T, H]`` (float32) whose routing follows a Zipf law.

    Args:
        model: the seeded model (its gates define the directions).
        zipf_s: Zipf exponent (0 = uniform targets).
        noise: standard deviation of the Gaussian part.
        bias: length of the push towards each layer's target expert.
        seed: the stream's seed (e.g. the member id).
    """

    def __init__(
        self, model: MoEModelConfig, zipf_s: float, noise: float, bias: float, seed: int
    ) -> None:
        self.model = model
        self.noise = float(noise)
        self.bias = float(bias)
        gates = [seeded_gate(model, layer) for layer in range(model.num_layers)]
        self._directions = [g / g.norm(dim=1, keepdim=True) for g in gates]  # [E, H] each
        self._popularity = torch.stack(
            [
                zipf_weights(model.num_experts, zipf_s, model.seed, layer)
                for layer in range(model.num_layers)
            ]
        )  # [L, E]
        self._gen = torch.Generator().manual_seed(seed)

    @property
    def popularity(self) -> torch.Tensor:
        """float64 [L, E]: the target distribution of each layer."""
        return self._popularity

    def sample(self, num_tokens: int) -> torch.Tensor:
        """float32 [T, H]: ``T`` new tokens (``T`` may be 0)."""
        hidden = self.noise * torch.randn(num_tokens, self.model.hidden_size, generator=self._gen)
        if num_tokens == 0:
            return hidden
        for layer, directions in enumerate(self._directions):
            targets = torch.multinomial(
                self._popularity[layer], num_tokens, replacement=True, generator=self._gen
            )
            hidden += self.bias * directions[targets]
        return hidden


def probe_batch(
    model: MoEModelConfig, zipf_s: float, noise: float, bias: float, num_tokens: int
) -> torch.Tensor:
    """float32 [T, H]: the fixed batch every check runs (the same in every process)."""
    return SkewedTokens(model, zipf_s, noise, bias, seed=PROBE_SEED).sample(num_tokens)


def probe_slice(num_tokens: int, rank: int, world_size: int) -> slice:
    """The rows of the probe batch that ``rank`` of ``world_size`` runs (contiguous, in order)."""
    return slice(rank * num_tokens // world_size, (rank + 1) * num_tokens // world_size)
