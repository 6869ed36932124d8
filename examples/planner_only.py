"""The planner alone: plan from a load file, keep the routing tables current, route tokens.

    python examples/planner_only.py          # CPU, one process, a few seconds

For an engine that moves its own weights and wants only the placement and the routing: the load
([L, E] tokens per expert, e.g. summed from the engine's counters) is read from a ``.npy`` file,
planned into a :class:`Placement`, written into fixed-address :class:`PlacementBuffers` (the
tables a forward, or a captured CUDA graph, reads), and tokens are routed through them with
:func:`elastic_ep.moe.route_to_slots`. Then the load drifts (a movement-aware re-plan) and the
job grows from 8 to 10 ranks (a re-plan with a rank mapping): each time the tables are rewritten
in place and the same routing code follows. The command line does the planning part too:
``python -m elastic_ep plan --load load.npy --ranks 8 --slots 5``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from elastic_ep import Placement, PlacementBuffers, RankMapping, plan, plan_with_report
from elastic_ep.moe import count_slot_tokens_, route_to_slots

LAYERS, EXPERTS, SLOTS, TOP_K = 4, 32, 5, 2
MAX_RANKS = 10


def tokens_per_rank(
    buffers: PlacementBuffers, placement: Placement, load: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """int32 [L, R]: (token, expert) pairs each rank receives when ``num_tokens`` tokens, whose
    top-k experts follow ``load``, are routed through the tables (every rank routes its share)."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(LAYERS, buffers.capacity, dtype=torch.int32)
    for layer in range(LAYERS):
        probs = (load[layer] / load[layer].sum()).expand(num_tokens, -1)
        ids = torch.multinomial(probs, TOP_K, generator=gen)  # int64 [T, K] logical experts
        for rank, share in enumerate(ids.chunk(placement.num_ranks)):
            slots = route_to_slots(
                share, buffers.log2phy[layer], buffers.logcnt[layer], rank_offset=rank
            )  # int64 [T/R, K] physical slots
            # each slot holds the expert the token chose: the tables and the placement agree
            assert torch.equal(buffers.phy2log[layer][slots], share)
            count_slot_tokens_(counts[layer], slots)
    return counts[:, : placement.num_slots].view(LAYERS, placement.num_ranks, SLOTS).sum(-1)


def imbalance(per_rank: torch.Tensor) -> float:
    """Busiest rank over the mean, averaged over layers (1.0 = perfectly even)."""
    per_rank = per_rank.double()
    return float((per_rank.max(1).values / per_rank.mean(1)).mean())


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "load.npy"
        np.save(path, rng.zipf(1.6, size=(LAYERS, EXPERTS)).astype(np.float64))  # skewed
        load = torch.from_numpy(np.load(path))  # float64 [L, E]
    buffers = PlacementBuffers(LAYERS, EXPERTS, MAX_RANKS * SLOTS / EXPERTS)

    uniform = plan(torch.ones(LAYERS, EXPERTS), 8, SLOTS)  # before any load was seen
    buffers.update_(uniform)
    before = imbalance(tokens_per_rank(buffers, uniform, load, 4096))
    placement = plan(load, 8, SLOTS, previous=uniform)  # hot experts get replicas
    buffers.update_(placement)  # in place: the tables keep their addresses
    after = imbalance(tokens_per_rank(buffers, placement, load, 4096))
    print(f"8 ranks: busiest rank / mean {before:.2f} (uniform plan) -> {after:.2f} (planned)")
    if not after < before:
        raise SystemExit("the planned placement should spread the load better")

    drifted = load * torch.from_numpy(rng.uniform(0.5, 1.5, size=(LAYERS, EXPERTS)))
    report = plan_with_report(drifted, 8, SLOTS, previous=placement, max_transfers=8)
    buffers.update_(report.placement)
    moved = int(report.transfers.sum())
    print(
        f"load drift: {moved} expert weights to move (at most 8 per layer), busiest / mean "
        f"{imbalance(tokens_per_rank(buffers, report.placement, drifted, 4096)):.2f}"
    )

    grown = plan_with_report(
        drifted, 10, SLOTS, previous=report.placement, rank_mapping=RankMapping.resize(8, 10)
    )
    buffers.update_(grown.placement)
    print(
        f"8 -> 10 ranks: {int(grown.transfers.sum())} expert weights to move, busiest / mean "
        f"{imbalance(tokens_per_rank(buffers, grown.placement, drifted, 4096)):.2f}"
    )
    print(f"planner_only: OK ({LAYERS} layers x {EXPERTS} experts, 8 -> 10 ranks x {SLOTS} slots)")


if __name__ == "__main__":
    main()
