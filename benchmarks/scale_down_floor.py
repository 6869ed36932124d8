"""Fewest weight moves any plan needs to reach a scale-down's balancedness target: an exact MILP.

The sweep (:mod:`planner_sweep`) counts a scale-down's minimum moves as the experts left with no
replica: a bound that ignores balancedness. This script asks how many moves a plan needs that
also reaches vLLM's balancedness less 0.01 (the issue's movement-aware target), and compares the
planner with it. Per cell, for one layer of the sweep's load, the previous placement (our fresh
plan) mapped onto the surviving ranks (``kept``: R' ranks x S slots) and load ``w`` [E]:

* binary ``x[e, r]``: rank r holds a replica of expert e (at most S per rank);
* continuous ``f[e, r]`` in [0, w_e x[e, r]]: the tokens of e that rank r serves (routing
  shares, without their integer units), summing to w_e over r;
* every rank serves at most ``peak = mean / target``;
* minimise the replicas on ranks that did not hold them (weights received).

Continuous shares relax the planner's integer units and include the equal split, so the optimum
is a lower bound on the moves of any plan that reaches the target, ours or vLLM's. HiGHS
(``scipy.optimize.milp``) solves it within ``--time-limit`` seconds per cell or returns its
bound and best plan so far. The sweep's loads are one Zipf profile permuted per layer, so every
layer of a cell is the same problem up to relabelling; layer 0 stands for all. Global plans only
(a hierarchical plan adds the node constraint).

    pip install scipy   # HiGHS; needed by this script only
    python benchmarks/scale_down_floor.py --vllm-wheel \
        .carry/wheels/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from planner_sweep import (
    MODELS,
    Cell,
    event_mapping,
    minimum_per_layer,
    on_new_ranks,
    vllm_placement,
    zipf_load,
)

from elastic_ep.adapters.vllm import load_policy_modules
from elastic_ep.eplb import Placement, plan, plan_with_report
from elastic_ep.eplb.planner import kept_on_new_ranks

BALANCE_GAP = 0.01  # the movement-aware target: balancedness >= vLLM's - 0.01
# Global scale-down and one-dead-rank cells of the sweep over twice their minimum, small enough
# (E x R' <= 4000 binaries) for HiGHS in about a minute: (experts, ranks, slots, event).
CELLS = (
    (64, 16, 5, "down"),
    (64, 16, 5, "dead"),
    (64, 32, 3, "down"),
    (64, 64, 2, "down"),
    (64, 64, 3, "down"),
    (128, 16, 9, "dead"),
    (128, 32, 5, "down"),
    (128, 32, 5, "dead"),
)


@dataclass(frozen=True)
class Floor:
    bound: float  # no plan reaches the target with fewer moves
    found: int | None  # moves of the best plan HiGHS found (None: none in time)
    optimal: bool


def fewest_moves(kept: np.ndarray, load: np.ndarray, target: float, time_limit: float) -> Floor:
    """The MILP of the module docstring for ``kept`` int64 [R', S] (-1 = empty) and ``load``
    float64 [E], at balancedness ``target``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    ranks, slots = kept.shape
    experts = load.size
    weight = load / load.sum()
    held = np.zeros((experts, ranks), dtype=bool)
    rank_of = np.repeat(np.arange(ranks), slots)
    present = kept.ravel() >= 0
    held[kept.ravel()[present], rank_of[present]] = True
    pairs = experts * ranks  # variables: x (pairs), then f (pairs), both expert-major
    expert_of, rank_col = np.divmod(np.arange(pairs), ranks)
    x_col, f_col = np.arange(pairs), pairs + np.arange(pairs)
    ones = np.ones(pairs)

    def rows(index: np.ndarray, columns: np.ndarray, values: np.ndarray, count: int) -> csr_matrix:
        return csr_matrix((values, (index, columns)), shape=(count, 2 * pairs))

    peak = (1.0 / ranks) / target
    constraints = [
        LinearConstraint(rows(rank_col, x_col, ones, ranks), -np.inf, slots),
        LinearConstraint(rows(expert_of, f_col, ones, experts), weight, weight),
        LinearConstraint(rows(rank_col, f_col, ones, ranks), -np.inf, peak),
        LinearConstraint(  # f[e, r] <= w_e x[e, r]
            rows(
                np.concatenate([np.arange(pairs), np.arange(pairs)]),
                np.concatenate([f_col, x_col]),
                np.concatenate([ones, -weight[expert_of]]),
                pairs,
            ),
            -np.inf,
            0.0,
        ),
    ]
    cost = np.concatenate([(~held).ravel().astype(np.float64), np.zeros(pairs)])
    result = milp(
        cost,
        constraints=constraints,
        integrality=np.concatenate([ones, np.zeros(pairs)]),
        bounds=Bounds(np.zeros(2 * pairs), np.concatenate([ones, weight[expert_of]])),
        options={"time_limit": time_limit},
    )
    found = None if result.x is None else round(float(result.fun))
    bound = float(result.mip_dual_bound) if result.mip_dual_bound is not None else 0.0
    return Floor(bound, found, result.status == 0)


def layer_balancedness(placement: Placement, load: torch.Tensor) -> np.ndarray:
    """float64 [L]: mean / max rank load per layer (with the placement's routing units)."""
    loads = placement.rank_loads(load)
    return (loads.mean(1) / loads.max(1).values).numpy()


def run(experts: int, ranks: int, slots: int, event: str, policy: type, limit: float) -> str:
    cell = Cell(experts, MODELS[experts], ranks, slots, 1)
    load = zipf_load(cell.layers, experts)
    weight = torch.from_numpy(load)
    mine = plan(load, ranks, slots)
    base = vllm_placement(policy, cell, weight, ranks)
    mapping, dead = event_mapping(cell, event)
    new_ranks = mapping.new_world_size
    report = plan_with_report(
        load, new_ranks, slots, previous=mine, rank_mapping=mapping, dead_ranks=dead
    )
    theirs = vllm_placement(
        policy, cell, weight, new_ranks, on_new_ranks(base.phy2log, mapping, slots)
    )
    ours_balance = float(layer_balancedness(report.placement, weight)[0])
    vllm_balance = float(layer_balancedness(theirs, weight)[0])
    vllm_moves = int(theirs.transfers_from(base, mapping)[0].sum())
    minimum = int(minimum_per_layer(mine, mapping, slots)[0])
    kept = kept_on_new_ranks(mine, mapping)[0]
    floors = [
        describe(fewest_moves(kept, load[0], target, limit))
        for target in (vllm_balance - BALANCE_GAP, ours_balance)
    ]
    return (
        f"| {experts} x {cell.layers}, {ranks} -> {new_ranks} x {slots} | {event} | {minimum} "
        f"| {int(report.transfers[0])}, {ours_balance:.4f} | {vllm_moves}, {vllm_balance:.4f} "
        f"| {floors[0]} | {floors[1]} |"
    )


def describe(floor: Floor) -> str:
    if floor.found is None:
        return f"none found (>= {floor.bound:.0f})"
    return str(floor.found) if floor.optimal else f"{floor.found} (>= {floor.bound:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-wheel", type=Path, required=True)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP")
    args = parser.parse_args()
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise SystemExit("this script needs scipy (HiGHS): pip install scipy") from None
    torch.set_num_threads(1)
    _, default, version = load_policy_modules(args.vllm_wheel)
    print(
        f"Layer 0 of each cell (vLLM {version}; HiGHS, {args.time_limit:.0f} s per MILP). "
        "Moves = weights received by the layer; min. = experts with no surviving replica; "
        "fewest: the optimum, or the best plan found (>= the proven bound).\n"
    )
    print(
        "| cell (experts x layers, ranks x slots) | event | min. | ours: moves, bal. "
        "| vLLM: moves, bal. | fewest moves to vLLM's bal. - 0.01 | fewest moves to ours |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for experts, ranks, slots, event in CELLS:
        print(
            run(experts, ranks, slots, event, default.DefaultEplbPolicy, args.time_limit),
            flush=True,
        )


if __name__ == "__main__":
    main()
