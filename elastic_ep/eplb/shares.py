"""Routing shares: how much of an expert's tokens each of its replicas takes.

A placement fixes which ranks hold a replica of each expert; the router may still split an
expert's tokens unevenly over them (``Placement.units``: slot ``p`` takes ``units[p] /
logcnt[e]``). Moving load from a replica on a heavy rank to one of the same expert on a light rank
costs no weight transfer, so the planner chooses the units that minimise the heaviest rank.

That is a min-max flow; :func:`solve_shares` approximates it, vectorised over layers:

1. Diffusion: every replica's load ``x_p`` moves towards the mean load of its expert's ranks,
   ``x_p += (lam_e - L_r) / m_r`` where ``L_r`` is the load of the replica's rank, ``m_r`` the
   replicas on that rank whose share can move and ``lam_e`` the mean of ``L_r`` over the
   expert's ranks weighted by ``1 / m_r`` (so the expert's load is conserved). A rank's new
   load is then a mean of its experts' ``lam_e``, never above the heaviest rank: the heaviest
   rank only falls, with no overshoot however many experts share a rank (a Jacobi step on the
   rank graph's Laplacian; an undamped water-filling of all experts at once pours every expert
   into the same light rank). A replica keeps at least one routing unit. At most
   ``ITERATIONS`` steps, fewer once no layer's heaviest rank falls by ``MIN_GAIN``.
2. Integer units: ``U = min(max_units, UNITS_PER_REPLICA * k)`` units for an expert of ``k``
   replicas; each replica gets ``floor(x_p / unit)`` (at least 1) and the units left over go to
   the replicas whose rank stays lightest with one more; each expert's units are then divided
   by their greatest common divisor.
3. A layer keeps the shares only where they lower its heaviest rank; elsewhere all units are 1.

Step 3 makes shares never worse than the equal split. Only some replicas move (the others keep
the equal split and count as fixed load): those of experts with a replica on a heavy rank and
at least ``MIN_UNITS_PER_REPLICA`` units per replica, in layers whose heaviest rank has room to
fall (:func:`_movable`); a rounding unit coarser than the gain would take it back. Each step is
a few ``bincount`` passes over the movable slots (two 16-bit radix sorts in step 2), so the
cost is about linear in L x P; with one slot per rank a rank holds one replica and the equal
split is already optimal: nothing runs.
"""

from __future__ import annotations

import numpy as np

UNITS_PER_REPLICA = 64
"""Routing units per replica of an expert whose split is uneven (capped by ``max_units``): a
share is set in steps of 1/64 of the equal split."""
ITERATIONS = 8
"""Diffusion steps (step 1)."""
MIN_UNITS_PER_REPLICA = 32
"""Experts with fewer units per replica (``max_units`` small for their replica count) keep the
equal split: rounding would undo most of what their shares gain."""
MIN_GAIN = 1e-3
"""Relative fall of a layer's heaviest rank below which shares are not worth solving for."""
HEAVY = 0.5
"""Experts with a replica on a rank in this upper part of [mean, heaviest] get shares."""


def solve_shares(slots: np.ndarray, load: np.ndarray, max_units: int) -> np.ndarray:
    """int64 [L, R, S]: routing units per slot (0 for empty slots), never raising a layer's
    heaviest rank above the equal split's.

    Args:
        slots: int64 [L, R, S] logical expert per slot, -1 = empty.
        load: float64 [L, E] non-negative load per expert.
        max_units: most units one expert may have (``Placement.max_units``).
    """
    units = (slots >= 0).astype(np.int64)
    layers, ranks, per_rank = slots.shape
    if per_rank == 1:
        return units
    experts = load.shape[1]
    # Groups are layer * (E + 1) + expert; column E of a layer stands for its empty slots: it
    # counts them and carries no load.
    offset = np.arange(layers)[:, None, None] * (experts + 1)
    group_of = (np.where(slots >= 0, slots, experts) + offset).reshape(-1)  # [L * R * S]
    count = np.bincount(group_of, minlength=layers * (experts + 1))
    weight = np.zeros((layers, experts + 1))
    weight[:, :experts] = load
    weight = weight.ravel()
    total_units = np.minimum(max_units, UNITS_PER_REPLICA * count)
    equal = weight / np.maximum(count, 1)  # a replica's load under the equal split
    rank_load = _sum_slots(equal[group_of].reshape(layers, ranks, per_rank))
    slot = _movable(group_of, rank_load, weight, count, total_units, per_rank)
    if slot.size == 0:
        return units
    group, rank = group_of[slot], slot // per_rank
    # The other slots keep the equal split: their loads are fixed.
    moving = np.bincount(rank, weights=equal[group], minlength=layers * ranks)
    fixed = np.maximum(rank_load.ravel() - moving, 0.0)
    problem = _Problem(group, rank, weight, count, total_units, fixed, layers, ranks)
    equal_peak = problem.peaks(equal[group])
    share = _diffuse(problem, equal[group], equal_peak)
    if not (problem.peaks(share) < equal_peak * (1.0 - MIN_GAIN)).any():
        return units  # no layer gains enough to survive rounding
    slot_units = _integer_units(problem, share)
    peak = problem.peaks(problem.weight * slot_units / problem.total_of(slot_units))
    keep = (peak < equal_peak * (1.0 - 1e-12))[rank // ranks]
    units.ravel()[slot[keep]] = slot_units[keep]
    return units


def _sum_slots(values: np.ndarray) -> np.ndarray:
    """[L, R]: ``values`` [L, R, S] summed over the slots, one whole-array add per slot (numpy's
    reduction over a short last axis costs about ten times more)."""
    total = values[..., 0].copy()
    for slot in range(1, values.shape[2]):
        total += values[..., slot]
    return total


def _movable(
    group_of: np.ndarray,
    rank_load: np.ndarray,
    weight: np.ndarray,
    count: np.ndarray,
    total_units: np.ndarray,
    per_rank: int,
) -> np.ndarray:
    """int64 [M]: the flat indices into [L, R, S] of the slots whose share may move (the others
    keep the equal split).

    A slot's expert must have 2+ replicas, load, at least ``MIN_UNITS_PER_REPLICA`` units per
    replica and a replica on a heavy rank of its layer, one in the upper ``HEAVY`` of the range
    from the mean to the heaviest rank (only such experts can lower the heaviest ranks, so a
    nearly balanced layer costs little); and its layer must be able to gain: its heaviest rank
    above every rank's least load (its fixed load plus one unit per movable replica) and the
    mean by a relative ``MIN_GAIN`` and by one unit of the coarsest movable replica on it.
    Experts are picked from the heavy ranks' slots, so the cost beyond one pass over the slots
    is linear in the movable slots, not in L x R x S.

    Args:
        group_of: int64 [L * R * S] each slot's group (layer * (E + 1) + expert).
        rank_load: float64 [L, R] rank loads under the equal split.
        weight, count, total_units: [L * (E + 1)] load, replicas and units to use per group.
    """
    layers, ranks = rank_load.shape
    mean, peak = rank_load.mean(1), rank_load.max(1)
    heavy = rank_load >= (mean + (1.0 - HEAVY) * (peak - mean))[:, None]
    candidate = np.zeros(count.size, dtype=bool)
    candidate[group_of.reshape(-1, per_rank)[heavy.ravel()]] = True
    candidate &= (count >= 2) & (weight > 0) & (total_units >= MIN_UNITS_PER_REPLICA * count)
    slot = np.flatnonzero(candidate[group_of])
    group = group_of[slot]
    unit = weight / np.maximum(total_units, 1)  # load of one routing unit
    above_unit = weight[group] / count[group] - unit[group]
    floor = rank_load - np.bincount(
        slot // per_rank, weights=above_unit, minlength=layers * ranks
    ).reshape(layers, ranks)
    room = peak - np.maximum(floor.max(1), mean)
    # Rounding moves a rank by up to a unit of each replica it holds: a layer whose room is
    # within one unit of its heaviest rank's coarsest movable replica would lose it again.
    on_peak = group_of.reshape(layers, ranks, per_rank)[np.arange(layers), rank_load.argmax(1)]
    coarsest = np.where(candidate[on_peak], unit[on_peak], 0.0).max(1)
    gains = (room > MIN_GAIN * peak) & (room > coarsest)
    return slot[gains[slot // (ranks * per_rank)]]


class _Problem:
    """The replicated slots of all layers, flattened: ``group`` (layer * E + expert, renumbered
    densely in that order) and ``rank`` (layer * R + rank) int64 [N] per slot; per slot its
    group's ``weight``, ``count`` (replicas), ``units`` (total to reach) and ``unit`` (load of
    one unit), per group ``spare`` (load above one unit per replica); ``fixed`` float64
    [L * R] the load shares cannot move."""

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
        self.rank, self.fixed = rank, fixed
        self.layers, self.ranks = layers, ranks
        self.weight = weight[group]
        self.unit = self.weight / units[group]  # load of one routing unit
        self.units = units[group]
        self.count = count[group]
        # The groups with a movable slot, renumbered 0.. in their order: per-group arrays as
        # long as those groups, not all L * (E + 1) (far more where few slots move).
        present = np.zeros(weight.size, dtype=bool)
        present[group] = True
        kept = np.flatnonzero(present)
        self.group = (np.cumsum(present) - 1)[group]
        self.size = kept.size
        # float64 [size]: each group's load above one unit per replica
        self.spare = (weight - count * (weight / np.maximum(units, 1)))[kept]

    def rank_loads(self, share: np.ndarray) -> np.ndarray:
        """float64 [L * R] with ``share`` float64 [N] the load of each replicated slot."""
        return self.fixed + np.bincount(self.rank, weights=share, minlength=self.fixed.size)

    def peaks(self, share: np.ndarray) -> np.ndarray:
        """float64 [L]: heaviest rank of each layer."""
        return self.rank_loads(share).reshape(self.layers, self.ranks).max(1)

    def total_of(self, values: np.ndarray) -> np.ndarray:
        """[N]: ``values`` [N] summed over each slot's group."""
        return np.bincount(self.group, weights=values, minlength=self.size)[self.group]


def _diffuse(problem: _Problem, share: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """float64 [N]: each replicated slot's load after diffusion steps from ``share`` float64
    [N] (step 1 of the module docstring): ``ITERATIONS`` at most, fewer once no layer's heaviest
    rank (``peak`` float64 [L] before the first) falls by a relative ``MIN_GAIN`` in a step."""
    group, size = problem.group, problem.size
    movable = np.bincount(problem.rank, minlength=problem.fixed.size)[problem.rank]
    inverse = 1.0 / movable
    # Groups without a movable slot weigh 0: the floor only keeps their (unused) level finite.
    weight_sum = np.maximum(np.bincount(group, weights=inverse, minlength=size), 1e-300)
    loads = problem.rank_loads(share)  # [L * R], carried from one step to the next
    for _ in range(ITERATIONS):
        rank_load = loads[problem.rank]
        level = np.bincount(group, weights=rank_load * inverse, minlength=size) / weight_sum
        share = share + (level[group] - rank_load) * inverse
        # At least one unit per replica; the rest rescaled so that the expert's load stays.
        above = np.maximum(share - problem.unit, 0.0)
        above_sum = np.bincount(group, weights=above, minlength=size)
        share = problem.unit + above * (problem.spare / np.maximum(above_sum, 1e-300))[group]
        loads = problem.rank_loads(share)
        now = loads.reshape(problem.layers, problem.ranks).max(1)
        if not (now < peak * (1.0 - MIN_GAIN)).any():
            return share
        peak = now
    return share


def _integer_units(problem: _Problem, share: np.ndarray) -> np.ndarray:
    """int64 [N]: whole units per replicated slot for the loads ``share`` float64 [N]: the
    units each fills entirely (at least 1), the units left over to the slots whose rank is
    lightest with one more; divided by each group's gcd (step 2 of the module docstring)."""
    units = np.maximum(1, np.floor(share / problem.unit + 1e-9)).astype(np.int64)
    left = problem.units - problem.total_of(units.astype(np.float64)).astype(np.int64)
    # A slot's rank load with one more unit: the left-over units go to the lowest in each group.
    after = problem.rank_loads(share)[problem.rank] - share + problem.unit * (units + 1)
    order = _grouped_order(problem.group, after)
    # The groups in ``order`` are ascending: their sizes give where each starts.
    lengths = np.bincount(problem.group, minlength=problem.size)
    lengths = lengths[lengths > 0]
    starts = np.cumsum(lengths) - lengths
    position = np.arange(order.size) - np.repeat(starts, lengths)
    units[order] += position < left[order]
    # Floating-point slack could leave a group over its total: those keep the equal split.
    over = problem.total_of(units.astype(np.float64)) > problem.units
    units[over] = 1
    divisor = np.gcd.reduceat(units[order], starts)
    units[order] //= np.repeat(divisor, lengths)
    return units


def _grouped_order(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """int64 [N]: indices sorting ``group`` int64 [N] (>= 0), then ``key`` float64 [N] (>= 0)
    within a group, then the index.

    Two stable radix passes (numpy's stable sort of uint16 is a radix sort, linear and many
    times faster than a lexsort): the key in 16 bits of the largest key, then the group. Keys
    closer than 2^-16 of the largest (a rank load; a routing unit weighs far more) count as
    equal.
    """
    if group.size and int(group.max()) > np.iinfo(np.uint16).max:
        return np.lexsort((key, group))
    top = float(key.max(initial=0.0))
    scale = (2.0**16 - 1) / top if top > 0 else 0.0
    order = np.argsort((key * scale).astype(np.uint16), kind="stable")
    return order[np.argsort(group[order].astype(np.uint16), kind="stable")]
