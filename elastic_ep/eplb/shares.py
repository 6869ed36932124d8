"""Routing shares: how much of an expert's tokens each of its replicas takes.

A placement fixes which ranks hold a replica of each expert; the router may still split an
expert's tokens unevenly over them (``Placement.units``: slot ``p`` takes ``units[p] /
logcnt[e]``). Moving load from a replica on a heavy rank to one of the same expert on a light rank
costs no weight transfer, so the planner chooses the units that minimise the heaviest rank.

That is a min-max flow; :func:`solve_shares` approximates it, vectorised over layers:

1. Water-filling per expert: given the load ``o`` the expert's ranks carry from everything
   else, its load ``w`` fills them up to one level ``lam`` (``x_p = max(c, lam - o_p)``,
   ``sum x = w``, ``c`` = one routing unit, the least a replica can take). All experts at once,
   a step halfway to their levels (Jacobi with damping 1/2: two experts that share a light rank
   would otherwise both pour into it), ``ROUNDS`` times; every layer keeps its best round.
2. Integer units: ``U = min(max_units, UNITS_PER_REPLICA * k)`` units for an expert of ``k``
   replicas; the level of step 1 is filled again in whole units (``u_p = floor((lam - o_p) / c)``
   and the units left over to the ranks that stay lightest with one more: the greedy fill,
   optimal for one expert given ``o``), each expert's units divided by their greatest common
   divisor.
3. A layer keeps the shares only where they lower its heaviest rank; elsewhere all units are 1.

Step 3 makes shares never worse than the equal split. Each step is a few ``bincount`` passes and
one sort over the replicated slots, so the cost is about linear in L x P; with one slot per rank
a rank holds one replica and the equal split is already optimal, so nothing runs.
"""

from __future__ import annotations

import numpy as np

UNITS_PER_REPLICA = 64
"""Routing units per replica of an expert whose split is uneven (capped by ``max_units``): a
share is set in steps of 1/16 of the equal split."""
ROUNDS = 6
"""Water-filling rounds (step 1)."""


def solve_shares(slots: np.ndarray, load: np.ndarray, max_units: int) -> np.ndarray:
    """int64 [L, R, S]: routing units per slot (0 for empty slots), never raising a layer's
    heaviest rank above the equal split's.

    Args:
        slots: int64 [L, R, S] logical expert per slot, -1 = empty.
        load: float64 [L, E] non-negative load per expert.
        max_units: most units one expert may have (``Placement.max_units``, P - E + 1).
    """
    layers, ranks, per_rank = slots.shape
    experts = load.shape[1]
    flat = slots.reshape(layers, -1)
    occupied = flat >= 0
    units = occupied.astype(np.int64)
    if per_rank == 1:
        return units.reshape(slots.shape)
    group = (np.arange(layers)[:, None] * experts + np.where(occupied, flat, 0))[occupied]
    rank = np.broadcast_to(
        np.arange(layers)[:, None] * ranks + np.arange(flat.shape[1]) // per_rank, flat.shape
    )[occupied]
    count = np.bincount(group, minlength=layers * experts)
    weight = load.ravel()
    multi = (count[group] >= 2) & (weight[group] > 0)
    if not multi.any():
        return units.reshape(slots.shape)
    fixed = np.bincount(
        rank[~multi], weights=weight[group[~multi]], minlength=layers * ranks
    )  # rank loads from experts with one replica: shares cannot move them
    problem = _Problem(
        group[multi],
        rank[multi],
        weight,
        count,
        np.minimum(max_units, UNITS_PER_REPLICA * count),
        fixed,
        layers,
        ranks,
    )
    equal = weight[problem.group] / count[problem.group]
    equal_peak = problem.peaks(equal)
    share = _water_fill_rounds(problem, equal, equal_peak)
    multi_units = _integer_units(problem, share)
    better = problem.peaks(weight[problem.group] * multi_units / problem.total_of(multi_units))
    better = better < equal_peak * (1.0 - 1e-12)
    where = np.flatnonzero(occupied.ravel())[multi]
    keep = better[problem.rank // ranks]
    units.ravel()[where[keep]] = multi_units[keep]
    return units.reshape(slots.shape)


class _Problem:
    """The replicated slots of all layers, flattened: ``group`` (layer * E + expert) and
    ``rank`` (layer * R + rank) int64 [N] per slot; per group ``weight``, ``count`` (replicas)
    and ``units`` (total to reach) [L * E]; ``fixed`` float64 [L * R] the load shares cannot
    move."""

    def __init__(
        self,
        group: np.ndarray,
        rank: np.ndarray,
        weight: np.ndarray,
        count: np.ndarray,
        units: np.ndarray,
        fixed: np.ndarray,
        layers: int,
        ranks: int,
    ) -> None:
        self.group, self.rank, self.fixed = group, rank, fixed
        self.layers, self.ranks = layers, ranks
        self.weight = weight[group]
        self.unit = self.weight / units[group]  # load of one routing unit
        self.units = units[group]
        self.count = count[group]
        self.size = weight.size

    def rank_loads(self, share: np.ndarray) -> np.ndarray:
        """float64 [L * R] with ``share`` float64 [N] the load of each replicated slot."""
        return self.fixed + np.bincount(self.rank, weights=share, minlength=self.fixed.size)

    def peaks(self, share: np.ndarray) -> np.ndarray:
        """float64 [L]: heaviest rank of each layer."""
        return self.rank_loads(share).reshape(self.layers, self.ranks).max(1)

    def total_of(self, values: np.ndarray) -> np.ndarray:
        """[N]: ``values`` [N] summed over each slot's group."""
        return np.bincount(self.group, weights=values, minlength=self.size)[self.group]

    def levels(self, other: np.ndarray) -> np.ndarray:
        """float64 [N]: the water level of each slot's group when its ranks carry ``other``
        [N] besides it: ``sum max(unit, level - other) = weight`` (exact: the set of slots above
        one unit only shrinks, so the loop ends within the largest replica count)."""
        active = np.ones(other.size, dtype=bool)
        while True:
            above = np.bincount(self.group, weights=active, minlength=self.size)[self.group]
            base = np.bincount(self.group, weights=other * active, minlength=self.size)
            floor = (self.count - above) * self.unit  # one unit for each slot at the floor
            level = (self.weight - floor + base[self.group]) / np.maximum(above, 1)
            still = active & (level - other > self.unit)
            if np.array_equal(still, active):
                return level
            active = still


def _water_fill_rounds(problem: _Problem, equal: np.ndarray, equal_peak: np.ndarray) -> np.ndarray:
    """float64 [N]: each replicated slot's load after the damped water-filling rounds, per layer
    the round with the lowest heaviest rank (the equal split if none is lower)."""
    share, best, best_peak = equal, equal, equal_peak
    layer_of = problem.rank // problem.ranks
    for _ in range(ROUNDS):
        other = problem.rank_loads(share)[problem.rank] - share
        target = np.maximum(problem.unit, problem.levels(other) - other)
        target *= problem.weight / problem.total_of(target)
        share = 0.5 * (share + target)
        peak = problem.peaks(share)
        improved = peak < best_peak
        best = np.where(improved[layer_of], share, best)
        best_peak = np.minimum(peak, best_peak)
    return best


def _integer_units(problem: _Problem, share: np.ndarray) -> np.ndarray:
    """int64 [N]: whole units per replicated slot filling each expert to the level ``share``
    implies, leftover units to the ranks lightest after one more, divided by each group's gcd."""
    other = problem.rank_loads(share)[problem.rank] - share
    level = problem.levels(other)
    units = np.maximum(1, np.floor((level - other) / problem.unit + 1e-9)).astype(np.int64)
    left = problem.units - problem.total_of(units.astype(np.float64)).astype(np.int64)
    # Leftover units: one each to the slots whose rank is lightest with it.
    order = np.lexsort((other + problem.unit * (units + 1), problem.group))
    grouped = problem.group[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    lengths = np.diff(np.r_[starts, grouped.size])
    position = np.arange(grouped.size) - np.repeat(starts, lengths)
    units[order] += position < left[order]
    # Floating-point slack could leave a group over its total: those keep the equal split.
    over = problem.total_of(units.astype(np.float64)) > problem.units
    units[over] = 1
    divisor = np.gcd.reduceat(units[order], starts)
    units[order] //= np.repeat(divisor, lengths)
    return units
