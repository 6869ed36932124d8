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

The last two columns are greedy heuristics measured against the optimum (:func:`greedy_moves`):
one weight moved at a time until the max-flow deficit (the load no routing fits under the peak)
is gone. The greedy tries every move that can lower it with a max-flow of its own and takes the
best: how far choosing moves one at a time gets. The rule tries them in one order (the expert
with the most load left over, onto the slot whose replica serves least, on the rank with the
most room) and takes the first that lowers it: about one max-flow per move, a candidate for a
planner that had a max-flow of its own (HiGHS and scipy are not among the library's
dependencies).

    pip install scipy   # HiGHS; needed by this script only
    python benchmarks/scale_down_floor.py --vllm-wheel \
        .carry/wheels/vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class Greedy:
    moves: int  # weights received
    reached: bool  # False: no move it tries lowers the deficit any more (a local optimum)
    flows: int  # max-flows solved
    slots: np.ndarray  # int64 [R', S], the placement it ends with


@dataclass(frozen=True)
class Flow:
    lost: float  # load that no routing fits under the peak (0: the peak is reachable)
    from_source: np.ndarray  # bool [E + R']: experts, then ranks, the source still reaches
    to_sink: np.ndarray  # bool [E + R']: experts, then ranks, that still reach the sink
    routed: np.ndarray  # float64 [E, R']: the load of expert e that rank r serves


FLOW_SCALE = 1e7  # scipy's max-flow takes integer capacities: loads in units of 1e-7 of the total
RULE_EXPERTS = 3  # the rule tries the experts with the most load left over, heaviest first,
RULE_TRIES = 20  # and per expert this many slots, until a move lowers the deficit


def _solve_flow(slots: np.ndarray, weight: np.ndarray, peak: float) -> tuple[Any, ...]:
    """scipy's max-flow of ``weight`` float64 [E] (summing to 1) from a source through the
    experts to the ranks of ``slots`` int64 [R', S] (-1 = empty) that hold them, at most
    ``peak`` per rank, to a sink: (graph, result, deficit, the experts and rank nodes of the
    occupied slots)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    ranks, per_rank = slots.shape
    experts = weight.size
    source, sink = experts + ranks, experts + ranks + 1
    held = slots.ravel() >= 0
    expert_of = slots.ravel()[held]
    rank_of = experts + np.repeat(np.arange(ranks), per_rank)[held]
    units = np.round(weight * FLOW_SCALE).astype(np.int64)
    tails = np.concatenate([np.full(experts, source), expert_of, experts + np.arange(ranks)])
    heads = np.concatenate([np.arange(experts), rank_of, np.full(ranks, sink)])
    capacity = np.concatenate([units, units[expert_of], np.full(ranks, int(peak * FLOW_SCALE))])
    graph = csr_matrix((capacity.astype(np.int32), (tails, heads)), shape=(sink + 1, sink + 1))
    result = maximum_flow(graph, source, sink)
    lost = (int(units.sum()) - result.flow_value) / FLOW_SCALE
    return graph, result, lost, expert_of, rank_of


def deficit(slots: np.ndarray, weight: np.ndarray, peak: float) -> float:
    """The load that no routing onto ``slots`` fits under ``peak`` (see :func:`max_flow`)."""
    return float(_solve_flow(slots, weight, peak)[2])


def max_flow(slots: np.ndarray, weight: np.ndarray, peak: float) -> Flow:
    """The max-flow of :func:`_solve_flow` with what its residual graph still connects."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    graph, result, lost, expert_of, rank_of = _solve_flow(slots, weight, peak)
    experts, ranks = weight.size, slots.shape[0]
    source, sink = experts + ranks, experts + ranks + 1
    residual = csr_matrix(graph - result.flow)
    residual.data = residual.data > 0
    residual.eliminate_zeros()
    reached = np.zeros((2, sink + 1), dtype=bool)
    reached[0, breadth_first_order(residual, source, return_predecessors=False)] = True
    reached[1, breadth_first_order(residual.T.tocsr(), sink, return_predecessors=False)] = True
    routed = np.zeros((experts, ranks))
    flow = result.flow.tocsr()[expert_of, rank_of]
    np.add.at(routed, (expert_of, rank_of - experts), np.asarray(flow).ravel() / FLOW_SCALE)
    return Flow(lost, reached[0, :source], reached[1, :source], routed)


def greedy_moves(
    kept: np.ndarray, load: np.ndarray, target: float, rule: bool = False, most: int = 200
) -> Greedy:
    """Weights moved one at a time until the max-flow at ``target`` routes all of ``load``
    float64 [E] onto ``kept`` int64 [R', S]. A move puts an expert the source still reaches (its
    load does not fit) on a rank that still reaches the sink, over a replica whose expert keeps
    another. Without ``rule`` it is the move that lowers the deficit most, each tried with a
    max-flow of its own; with ``rule``, the first that lowers it of the experts with the most
    load left over, each over the replicas that serve least on ranks with the most room."""
    ranks = kept.shape[0]
    experts = load.size
    weight = load / load.sum()
    peak = (1.0 / ranks) / target
    slots = kept.copy()
    moves, flows = 0, 1
    state = max_flow(slots, weight, peak)
    while state.lost > 1e-6 and moves < most:
        count = np.bincount(slots[slots >= 0], minlength=experts)
        left_over = weight - state.routed.sum(1)
        room = peak - state.routed.sum(0)
        if rule:
            movers = np.argsort(-left_over)[:RULE_EXPERTS]
            movers = movers[(left_over[movers] > 1e-9) & state.from_source[movers]]
        else:
            movers = np.flatnonzero(state.from_source[:experts])
        best: tuple[float, tuple[int, int, int] | None] = (state.lost - 1e-9, None)
        for expert in movers:
            options: list[tuple[float, float, int, int]] = []
            for open_rank in np.flatnonzero(state.to_sink[experts:]):
                if (slots[open_rank] == expert).any():
                    continue
                for slot, held in enumerate(slots[open_rank]):
                    if held < 0 or count[held] >= 2:
                        served = 0.0 if held < 0 else state.routed[held, open_rank]
                        options.append((served, -room[open_rank], int(open_rank), slot))
            if rule:
                options = sorted(options)[:RULE_TRIES]
            for *_, rank, slot in options:
                trial = slots.copy()
                trial[rank, slot] = expert
                flows += 1
                after = deficit(trial, weight, peak)
                if after < best[0]:
                    best = (after, (rank, slot, int(expert)))
                    if rule:
                        break
            if rule and best[1] is not None:
                break
        if best[1] is None:
            break
        rank, slot, expert = best[1]
        slots[rank, slot] = expert
        moves += 1
        state = max_flow(slots, weight, peak)
        flows += 1
    return Greedy(moves, state.lost <= 1e-6, flows, slots)


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
    targets = (vllm_balance - BALANCE_GAP, ours_balance)
    floors = [describe(fewest_moves(kept, load[0], target, limit)) for target in targets]
    greedy = [greedy_moves(kept, load[0], target) for target in targets]
    rule = [greedy_moves(kept, load[0], target, rule=True) for target in targets]
    return (
        f"| {experts} x {cell.layers}, {ranks} -> {new_ranks} x {slots} | {event} | {minimum} "
        f"| {int(report.transfers[0])}, {ours_balance:.4f} | {vllm_moves}, {vllm_balance:.4f} "
        f"| {floors[0]} | {floors[1]} | {' / '.join(map(describe_greedy, greedy))} "
        f"| {' / '.join(map(describe_greedy, rule))} |"
    )


def describe(floor: Floor) -> str:
    if floor.found is None:
        return f"none found (>= {floor.bound:.0f})"
    return str(floor.found) if floor.optimal else f"{floor.found} (>= {floor.bound:.0f})"


def describe_greedy(greedy: Greedy) -> str:
    moves = str(greedy.moves) if greedy.reached else f"stuck at {greedy.moves}"
    return f"{moves} ({greedy.flows} flows)"


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
        "| vLLM: moves, bal. | fewest moves to vLLM's bal. - 0.01 | fewest moves to ours "
        "| max-flow greedy: to vLLM's - 0.01 / to ours | the rule: the same |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for experts, ranks, slots, event in CELLS:
        print(
            run(experts, ranks, slots, event, default.DefaultEplbPolicy, args.time_limit),
            flush=True,
        )


if __name__ == "__main__":
    main()
