"""How close the routing-share solver comes to the best shares, on the planner's own placements.

A placement fixes which ranks hold each expert; routing shares split each expert's tokens over
its replicas. The shares that minimise the heaviest rank solve a linear program (continuous
shares; the planner's are whole units, ``Placement.units``). :func:`elastic_ep.eplb.shares.
solve_shares` approximates it with diffusion steps over the replicas that may move. This script
takes layer 0 of the planner's plans for some sweep cells (:mod:`planner_sweep`: fresh plans,
and plans after a scale-down or a dead rank, where shares carry most of the balance) and prints
each layer's balancedness (mean / heaviest rank) with the equal split, with ``solve_shares``
under each setting of ``--settings`` (``HEAVY,MIN_UNITS_PER_REPLICA,ITERATIONS``: the
module's constants, set for the call and restored), and with the linear program's optimum
(HiGHS through ``scipy.optimize.linprog``). Every setting solves the same placement: the
planner's, made with the module's constants as they are.

    pip install scipy   # HiGHS; needed by this script only
    python benchmarks/shares_gap.py
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from planner_sweep import GROUPS, MODELS, Cell, event_mapping, zipf_load

import elastic_ep.eplb.planner as planner_module
import elastic_ep.eplb.repair as repair_module
import elastic_ep.eplb.shares as shares
import elastic_ep.eplb.unit_balance as unit_balance_module
from elastic_ep.eplb import max_units, plan, plan_with_report
from elastic_ep.eplb.unit_balance import balance_with_units, node_shares

# (experts, ranks, slots, nodes, event): global and hierarchical cells of the sweep.
CELLS = (
    (64, 64, 2, 1, "down"),
    (64, 64, 3, 1, "down"),
    (64, 32, 3, 1, "down"),
    (128, 32, 5, 1, "dead"),
    (128, 128, 3, 1, "down"),
    (256, 128, 3, 1, "fresh"),
    (256, 128, 5, 1, "down"),
    (256, 512, 3, 1, "dead"),
    (384, 256, 3, 1, "down"),
    (384, 64, 9, 1, "fresh"),
    (256, 1024, 2, 8, "down"),
    (384, 512, 2, 8, "down"),
    (128, 64, 3, 8, "fresh"),
)


def best_balance(slots: np.ndarray, load: np.ndarray) -> float:
    """The balancedness of the best continuous shares for ``slots`` int64 [R, S] (-1 = empty)
    and ``load`` float64 [E]: minimise the heaviest rank P over shares f >= 0 per occupied slot
    that sum to each expert's load."""
    peak = best_shares(slots, load).sum(1).max()
    return float(load.sum() / slots.shape[0] / peak) if peak > 0 else 1.0


def best_shares(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [R, S]: each slot's load under the best continuous shares (0 for empty slots)
    for ``slots`` int64 [R, S] and ``load`` float64 [E] (experts without a slot carry none)."""
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    load = np.where(np.bincount(slots[slots >= 0], minlength=load.size) > 0, load, 0.0)

    ranks, per_rank = slots.shape
    held = np.flatnonzero(slots.ravel() >= 0)
    expert = slots.ravel()[held]
    rank = held // per_rank
    count = held.size
    columns = np.arange(count)
    # Variables: one share per occupied slot, then P.
    equal = csr_matrix((np.ones(count), (expert, columns)), shape=(load.size, count + 1))
    upper = csr_matrix(
        (
            np.concatenate([np.ones(count), -np.ones(ranks)]),
            (
                np.concatenate([rank, np.arange(ranks)]),
                np.concatenate([columns, np.full(ranks, count)]),
            ),
        ),
        shape=(ranks, count + 1),
    )
    cost = np.zeros(count + 1)
    cost[-1] = 1.0
    result = linprog(cost, A_ub=upper, b_ub=np.zeros(ranks), A_eq=equal, b_eq=load, method="highs")
    shares_of = np.zeros(slots.size)
    shares_of[held] = result.x[:count]
    return shares_of.reshape(slots.shape)


def exact_units(
    slots: np.ndarray,
    load: np.ndarray,
    most: int,
    mean: np.ndarray | None = None,
    warm: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [L, R, S]: routing units from the best continuous shares, in place of
    :func:`~elastic_ep.eplb.shares.solve_shares` (same arguments): per expert of k >= 2
    replicas with load, ``U = min(most, UNITS_PER_REPLICA * k)`` units, one per replica and the
    other U - k by its share, floored, the rest to the largest remainders; a layer keeps them
    only where they lower its heaviest rank, as ``solve_shares`` does. ``mean`` (a node row's
    layer mean, which ``solve_shares`` measures a row's room from) and ``warm`` (the units its
    diffusion starts from) are taken and not needed: the linear program lowers every row's
    heaviest rank as far as it goes, from no start."""
    units = (slots >= 0).astype(np.int64)
    for layer in range(slots.shape[0] if slots.shape[2] > 1 else 0):
        row, weight = slots[layer], load[layer]
        if weight.sum() <= 0:
            continue
        share = best_shares(row, weight)
        counts = np.bincount(row[row >= 0], minlength=weight.size)
        trial = units[layer].copy()
        for expert in np.flatnonzero((counts >= 2) & (weight > 0)):
            spare = min(most, shares.UNITS_PER_REPLICA * int(counts[expert])) - counts[expert]
            held = row == expert
            exact = share[held] / weight[expert] * spare
            whole = np.floor(exact).astype(np.int64)
            left = int(spare - whole.sum())
            whole[np.argsort(whole - exact, kind="stable")[:left]] += 1
            whole += 1
            trial[held] = whole // np.gcd.reduce(whole)
        # Balancedness is the mean over the heaviest rank: higher means a lower heaviest rank.
        both = balance_with_units(
            np.stack([row, row]), np.stack([weight, weight]), np.stack([trial, units[layer]])
        )[0]
        if both[0] > both[1] * (1.0 + 1e-12):
            units[layer] = trial
    return units


@contextmanager
def exact_shares() -> Iterator[None]:
    """Every ``solve_shares`` call the planner makes answered by :func:`exact_units` (a what-if:
    a linear program per layer, far slower)."""
    modules = (repair_module, planner_module, unit_balance_module)
    saved = [module.solve_shares for module in modules]
    for module in modules:
        module.solve_shares = exact_units
    try:
        yield
    finally:
        for module, solver in zip(modules, saved, strict=True):
            module.solve_shares = solver


@contextmanager
def solver_setting(heavy: float, min_units: int, iterations: int) -> Iterator[None]:
    saved = (shares.HEAVY, shares.MIN_UNITS_PER_REPLICA, shares.ITERATIONS)
    shares.HEAVY, shares.MIN_UNITS_PER_REPLICA, shares.ITERATIONS = heavy, min_units, iterations
    try:
        yield
    finally:
        shares.HEAVY, shares.MIN_UNITS_PER_REPLICA, shares.ITERATIONS = saved


def placement_of(cell: Cell, event: str) -> tuple[np.ndarray, np.ndarray]:
    """Layer 0 of the planner's plan for ``event``: slots int64 [1, R', S] and load [1, E]."""
    load = zipf_load(cell.layers, cell.experts)
    groups = GROUPS if cell.nodes > 1 else 1
    fresh = plan(load, cell.ranks, cell.slots, num_groups=groups, num_nodes=cell.nodes)
    if event == "fresh":
        placement = fresh
    else:
        mapping, dead = event_mapping(cell, event)
        placement = plan_with_report(
            load,
            mapping.new_world_size,
            cell.slots,
            num_groups=groups,
            num_nodes=cell.nodes,
            previous=fresh,
            rank_mapping=mapping,
            dead_ranks=dead,
        ).placement
    slots = placement.phy2log[:1].numpy().reshape(1, placement.num_ranks, -1)
    return slots, load[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["0.5,32,8", "1.0,16,32"],
        help="HEAVY,MIN_UNITS_PER_REPLICA,ITERATIONS per column",
    )
    args = parser.parse_args()
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise SystemExit("this script needs scipy (HiGHS): pip install scipy") from None
    settings = [tuple(s.split(",")) for s in args.settings]
    print(
        "Layer 0 of the planner's plan per cell: balancedness with the equal split, with "
        "solve_shares under each setting (HEAVY, MIN_UNITS_PER_REPLICA, ITERATIONS), and with "
        "the best continuous shares (linear program).\n"
    )
    columns = " | ".join(f"solve_shares {','.join(s)}" for s in settings)
    print(
        f"| cell (experts x layers, ranks x slots) | policy | event | equal split | {columns} | best |"
    )
    print("|---|---|---|---:|" + "---:|" * len(settings) + "---:|")
    for experts, ranks, slots_per_rank, nodes, event in CELLS:
        cell = Cell(experts, MODELS[experts], ranks, slots_per_rank, nodes)
        slots, load = placement_of(cell, event)
        most = max_units(slots.shape[1] * slots.shape[2], experts)
        ones = (slots >= 0).astype(np.int64)
        row = [f"{balance_with_units(slots, load, ones)[0][0]:.4f}"]
        for heavy, min_units, iterations in settings:
            with solver_setting(float(heavy), int(min_units), int(iterations)):
                units = node_shares(slots, load, most, nodes)
            row.append(f"{balance_with_units(slots, load, units)[0][0]:.4f}")
        new_ranks = slots.shape[1]
        print(
            f"| {experts} x {cell.layers}, {ranks} -> {new_ranks} x {slots_per_rank} "
            f"| {cell.policy} | {event} | {' | '.join(row)} | {best_balance(slots[0], load[0]):.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
