"""Scale-downs held to twice the minimum moves: what balancedness is left, against vLLM's.

The sweep (:mod:`planner_sweep`) counts a scale event's minimum moves as, per layer, the experts
with no surviving replica or the joined slots, whichever is more. A scale-up must fill its joined
slots, so its minimum is a plan that can be balanced; a scale-down joins no slot, and its minimum
(re-home the lost experts over surplus replicas) leaves the surviving ranks as they were while
their mean load rises by R / R'. This script runs every scale-down cell of the sweep's grid (and
the global one-dead-rank cells, a scale-down by one rank) whose minimum is at least 1% of the
slots three ways, on one thread, in one process:

* ours: ``plan_with_report`` with the previous placement, as the sweep calls it;
* ours held to twice the minimum: the same with ``max_transfers`` = 2 x the largest per-layer
  minimum (one budget for all layers, so layers with fewer lost experts get more than twice
  theirs);
* vLLM's ``DefaultEplbPolicy`` given its own previous placement re-indexed onto the new ranks.

It prints, per cell, the weights received over the minimum and the balancedness less vLLM's,
then how many cells reach vLLM - 0.01 within twice the minimum. ``--exact-shares`` runs our two
plans with the best continuous routing shares (a linear program per layer, HiGHS) wherever the
planner would call :func:`~elastic_ep.eplb.shares.solve_shares`: what a better share solver
would change (far slower; best with ``--ranks 16,32,64``).

    python benchmarks/scale_down_budget.py --vllm-wheel \
        .carry/wheels/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl [--ranks 8,16,32,64,128] \
        [--exact-shares]
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from planner_sweep import (
    GROUPS,
    MODELS,
    RANKS,
    Cell,
    cells,
    event_mapping,
    minimum_per_layer,
    on_new_ranks,
    vllm_placement,
    zipf_load,
)
from shares_gap import exact_shares

from elastic_ep.adapters.vllm import load_policy_modules
from elastic_ep.eplb import plan, plan_with_report

BALANCE_GAP = 0.01  # the movement-aware target: balancedness >= vLLM's - 0.01


@dataclass(frozen=True)
class BudgetRow:
    cell: Cell
    event: str
    minimum_pct: float  # the sweep's minimum, % of the new slots
    ours: tuple[float, float]  # (moved / minimum, balancedness - vLLM's)
    held: tuple[float, float] | None  # the same at twice the minimum (None: refused)
    vllm_ratio: float  # vLLM's moved / minimum


def run_row(cell: Cell, event: str, policy: Any) -> BudgetRow | None:
    """The three plans of one scale-down cell, or ``None`` where its minimum is under 1%."""
    groups = GROUPS if cell.nodes > 1 else 1
    load = zipf_load(cell.layers, cell.experts)
    weight = torch.from_numpy(load)
    mapping, dead = event_mapping(cell, event)
    ranks = mapping.new_world_size
    if ranks * cell.slots < cell.experts:
        return None
    mine = plan(load, cell.ranks, cell.slots, num_groups=groups, num_nodes=cell.nodes)
    per_layer = minimum_per_layer(mine, mapping, cell.slots)  # a scale-down joins no slot
    total = cell.layers * ranks * cell.slots
    minimum = int(per_layer.sum())
    if 100.0 * minimum / total < 1.0:
        return None

    base = vllm_placement(policy, cell, weight, cell.ranks)
    theirs = vllm_placement(
        policy, cell, weight, ranks, on_new_ranks(base.phy2log, mapping, cell.slots)
    )
    vllm_balance = theirs.balancedness(weight)

    def ours(budget: int | None) -> tuple[float, float] | None:
        try:
            report = plan_with_report(
                load,
                ranks,
                cell.slots,
                num_groups=groups,
                num_nodes=cell.nodes,
                previous=mine,
                rank_mapping=mapping,
                dead_ranks=dead,
                max_transfers=budget,
            )
        except ValueError:  # a hierarchical layer whose groups the budget cannot keep in nodes
            return None
        moved = float(report.transfers.sum()) / minimum
        return moved, report.placement.balancedness(weight) - vllm_balance

    unbounded = ours(None)
    assert unbounded is not None
    return BudgetRow(
        cell=cell,
        event=event,
        minimum_pct=100.0 * minimum / total,
        ours=unbounded,
        held=ours(2 * int(per_layer.max())),
        vllm_ratio=float(theirs.transfers_from(base, mapping).sum()) / minimum,
    )


def report(rows: list[BudgetRow]) -> str:
    lines = [
        "| cell (experts x layers, ranks x slots) | policy | event | min. | ours: moved / min., "
        "bal. - vLLM | at 2x min.: bal. - vLLM | vLLM moved / min. |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        c = row.cell
        held = "refused" if row.held is None else f"{row.held[1]:+.4f}"
        lines.append(
            f"| {c.experts} x {c.layers}, {c.ranks} x {c.slots} | {c.policy} | {row.event} | "
            f"{row.minimum_pct:.1f}% | {row.ours[0]:.1f}x, {row.ours[1]:+.4f} | {held} | "
            f"{row.vllm_ratio:.1f}x |"
        )
    within = [r for r in rows if r.ours[0] <= 2.0 + 1e-9]
    held_ok = [r for r in rows if r.held is not None and r.held[1] >= -BALANCE_GAP - 1e-12]
    lines.append("")
    lines.append(
        f"{len(rows)} cells; ours within 2x the minimum in {len(within)}; held to 2x the minimum, "
        f"at or above vLLM - {BALANCE_GAP} in {len(held_ok)}; vLLM within 2x the minimum in "
        f"{sum(r.vllm_ratio <= 2.0 for r in rows)}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-wheel", type=Path, required=True, help="vLLM wheel")
    parser.add_argument("--ranks", help="comma-separated subset of the rank counts")
    parser.add_argument("--experts", help="comma-separated subset of 64,128,256,384")
    parser.add_argument(
        "--exact-shares",
        action="store_true",
        help="what-if: our plans measured and routed with the best continuous shares (a linear "
        "program per layer, shares_gap.exact_units; needs scipy) instead of solve_shares",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, default, version = load_policy_modules(args.vllm_wheel)
    ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else RANKS
    experts = tuple(int(e) for e in args.experts.split(",")) if args.experts else tuple(MODELS)
    print(f"vLLM {version} DefaultEplbPolicy; torch threads = 1")
    rows = []
    with exact_shares() if args.exact_shares else nullcontext():
        for cell in cells(ranks, experts):
            for event in ("down", "dead") if cell.nodes == 1 else ("down",):
                row = run_row(cell, event, default.DefaultEplbPolicy)
                if row is not None:
                    rows.append(row)
                    print(report([row]).splitlines()[2], flush=True)
    print(report(rows))


if __name__ == "__main__":
    main()
