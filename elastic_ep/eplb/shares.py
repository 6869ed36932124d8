"""Routing shares: how much of an expert's tokens each of its replicas takes.

A placement fixes which ranks hold a replica of each expert; the router may still split an
expert's tokens unevenly over them (``Placement.units``: slot ``p`` takes ``units[p] /
logcnt[e]``). Moving load from a replica on a heavy rank to one of the same expert on a light rank
costs no weight transfer, so the planner chooses the units that minimise the heaviest rank.

That is a min-max flow; :func:`solve_shares` approximates it, vectorised over layers:

1. Diffusion, from the equal split or from given units (``warm``: the repair's units carried
   through a few swaps, which are near what the solve reaches), where every replica's load
   ``x_p`` moves towards the mean load of its expert's ranks,
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
fall (:func:`_movable`); a rounding unit coarser than the gain would take it back. With one
slot per rank (a rank holds one replica: the equal split is already optimal) or a
``max_units`` too small for two such replicas nothing runs; where no layer's heaviest rank
holds a movable replica and lies above the mean by more than it could gain, one pass over the
slots does. Otherwise the cost is about linear in L x P, and at the planner's sizes mostly
numpy's cost per call: passes over all slots are whole-array adds and gathers (the routing
units' loads and each rank's least load only over the movable groups and slots), each diffusion
step a few ``bincount`` passes over the movable slots (the clamp to one unit and its rescale
only in the rare steps that need it), step 2 two 16-bit radix sorts.
"""

from __future__ import annotations

import numpy as np

UNITS_PER_REPLICA = 64
"""Routing units per replica of an expert whose split is uneven (capped by ``max_units``): a
share is set in steps of 1/64 of the equal split."""
ITERATIONS = 8
"""Diffusion steps (step 1)."""
MIN_UNITS_PER_REPLICA = 8
"""Experts with fewer units per replica (``max_units`` small for their replica count) keep the
equal split: rounding would undo most of what their shares gain. The hottest expert of a layer
often has 40-140 replicas, so at 32 (``max_units`` <= 1024: at most 32 replicas) it kept the
equal split and the load its replicas could carry away from a heavy rank stayed there (384
experts on 256 -> 224 x 3, a scale-down: 0.9090 against 0.9232 at 8; 94 x 128 experts on 256
-> 288 x 2, a scale-up: 0.9149 -> 0.9392 with 13.9% -> 11.1% of the slots moved; at 4, no
gain over 8 in ``benchmarks/shares_gap.py``)."""
MIN_GAIN = 1e-3
"""Relative fall of a layer's heaviest rank below which shares are not worth solving for."""
HEAVY = 0.5
"""Experts with a replica on a rank in this upper part of [mean, heaviest] get shares."""


def solve_shares(
    slots: np.ndarray,
    load: np.ndarray,
    max_units: int,
    mean: np.ndarray | None = None,
    warm: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [L, R, S]: routing units per slot (0 for empty slots), never raising a layer's
    heaviest rank above the equal split's.

    Args:
        slots: int64 [L, R, S] logical expert per slot, -1 = empty.
        load: float64 [L, E] non-negative load per expert.
        max_units: most units one expert may have (``Placement.max_units``).
        mean: float64 [L], the mean rank load of the layer each row belongs to, where the
            row is part of one (a node of a hierarchical plan): the row's heavy ranks and
            room are measured from it (see :func:`_movable`); ``None``: the row's own.
        warm: int64 [L, R, S], routing units to start the diffusion from (an expert's units
            in any total; an expert whose units are all 0 starts from the equal split, as
            every expert does where ``warm`` is ``None``).
    """
    units = (slots >= 0).astype(np.int64)
    layers, ranks, per_rank = slots.shape
    # A movable expert has 2+ replicas of MIN_UNITS_PER_REPLICA units: max_units must hold them.
    if per_rank == 1 or max_units < 2 * MIN_UNITS_PER_REPLICA:
        return units
    experts = load.shape[1]
    # Groups are layer * (E + 1) + expert + 1: column 0 of a layer stands for its empty slots
    # (-1 + 1, so that one add numbers every slot): it counts them and carries no load.
    start = np.arange(1, layers * (experts + 1), experts + 1)
    group_of = (slots + start[:, None, None]).reshape(-1)  # [L * R * S]
    count = np.bincount(group_of, minlength=layers * (experts + 1))
    weight = np.zeros((layers, experts + 1))
    weight[:, 1:] = load
    weight = weight.ravel()
    # Each slot's load under the equal split, divided once per group or once per slot,
    # whichever are fewer (node-local slots numbered by global experts: groups far more).
    if count.size <= group_of.size:
        equal = (weight / np.maximum(count, 1)).take(group_of)
    else:
        equal = weight.take(group_of) / np.maximum(count.take(group_of), 1)
    rank_load = _sum_slots(equal.reshape(layers, ranks, per_rank))
    problem = _movable(group_of, rank_load, (weight, count, equal), max_units, mean)
    if problem is None:
        return units
    above, loads, peak = _diffuse(problem, None if warm is None else _warm_above(problem, warm))
    if not (peak < problem.peak * (1.0 - MIN_GAIN)).any():
        return units  # no layer gains enough to survive rounding
    slot_units, rounded = _integer_units(problem, above, loads)
    peak = problem.peaks(problem.rank_loads(rounded))
    gains = peak < problem.peak * (1.0 - 1e-12)
    slot = problem.slot
    if not gains.all():
        keep = gains[slot // (ranks * per_rank)]
        slot, slot_units = slot[keep], slot_units[keep]
    units.ravel()[slot] = slot_units
    return units


def _sum_slots(values: np.ndarray) -> np.ndarray:
    """[L, R]: ``values`` [L, R, S] summed over the slots, one whole-array add per slot (numpy's
    reduction over a short last axis costs about ten times more)."""
    total = values[..., 0].copy()
    for slot in range(1, values.shape[2]):
        total += values[..., slot]
    return total


class _Problem:
    """The movable slots of all layers, flattened. Per slot, int64 [N]: ``slot`` (flat index
    into [L, R, S]), ``group`` (its expert's group, renumbered densely in layer * E + expert
    order) and ``rank`` (layer * R + rank; rank * L + layer, rank-major, where R < L: a
    layer's heaviest rank is then a maximum over the leading axis of [R, L], several times
    faster than over a short last axis); float64 [N]: ``unit`` (load of one of its group's
    routing units) and ``above`` (its load above one unit under the equal split). Per group:
    ``spare`` float64 [G] (load above one unit per replica), ``units`` and ``length`` int64 [G]
    (units to reach, replicas: all of them movable) and ``weight`` float64 [G] (load).
    ``base`` float64 [L * R] or [R * L]: each rank's load with one unit per movable replica,
    numbered as ``rank``; ``peak`` float64 [L]: each layer's heaviest rank under the equal
    split."""

    def __init__(
        self,
        slot: np.ndarray,
        group: np.ndarray,
        per_group: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        base: np.ndarray,
        peak: np.ndarray,
        per_rank: int,
    ) -> None:
        layers, ranks = base.shape  # base: [L, R]
        rank = slot // per_rank
        self.rank_major = ranks < layers
        if self.rank_major:
            layer, rank = np.divmod(rank, ranks)
            rank *= layers
            rank += layer
            base = base.T
        self.slot, self.rank, self.base, self.peak = slot, rank, base.ravel(), peak
        self.group = group
        self.size = per_group[0].size
        weight, count, units, unit = per_group
        self.weight = weight
        self.spare = weight - count * unit
        self.units, self.length = units, count
        self.unit = unit.take(group)
        self.above = (self.spare / count).take(group)

    def rank_loads(self, above: np.ndarray) -> np.ndarray:
        """float64 [L * R] (or [R * L], numbered as ``rank``) with ``above`` float64 [N] each
        slot's load above one unit."""
        return self.base + np.bincount(self.rank, weights=above, minlength=self.base.size)

    def peaks(self, loads: np.ndarray) -> np.ndarray:
        """float64 [L]: each layer's heaviest rank of ``loads`` (numbered as ``rank``)."""
        if self.rank_major:
            return loads.reshape(-1, self.peak.size).max(0)
        return loads.reshape(self.peak.size, -1).max(1)


def _movable(
    group_of: np.ndarray,
    rank_load: np.ndarray,
    per_group: tuple[np.ndarray, np.ndarray, np.ndarray],
    max_units: int,
    layer_mean: np.ndarray | None = None,
) -> _Problem | None:
    """The slots whose share may move (the others keep the equal split), ``None`` if none.

    A slot's expert must have 2+ replicas, load, at least ``MIN_UNITS_PER_REPLICA`` units per
    replica and a replica on a heavy rank of its layer, one in the upper ``HEAVY`` of the range
    from the mean to the heaviest rank (only such experts can lower the heaviest ranks, so a
    nearly balanced layer costs little); and its layer must be able to gain: its heaviest rank
    must hold such a replica (else it cannot fall) and lie above every rank's least load (its
    fixed load plus one unit per movable replica) and the mean by a relative ``MIN_GAIN`` and
    by one unit of the coarsest movable replica on it. The heaviest rank's replicas and the
    mean are checked first (S slots per layer): a plan where they rule every layer out costs
    one pass over the slots.

    The mean is ``layer_mean`` where given. A node of a hierarchical plan is then checked as
    part of its layer, as a solve over the whole layer would: against the node's own mean, a
    node nearly even within itself but holding the layer's heaviest ranks had less room than
    one unit of its hot expert's replicas and kept the equal split (26 x 64 experts on 32 x 5
    slots, 4 nodes, a drifted load: the fresh plan 0.6937 with shares solved per node against
    its own mean, 0.6953 against the layer's, as over the whole layer). A node whose ranks
    all lie under the layer's mean has no heavy rank and keeps the equal split: it cannot set
    the layer's heaviest rank. (The lower of the two means moved the same weights and cost
    hierarchical movement-aware plans 3-11% more time in the sweep.)

    Args:
        group_of: int64 [L * R * S] each slot's group (layer * (E + 1) + expert + 1).
        rank_load: float64 [L, R] rank loads under the equal split.
        per_group: load and replicas, each [L * (E + 1)], and each slot's load under the
            equal split, float64 [L * R * S].
        max_units: most units one expert may have.
        layer_mean: float64 [L], the mean rank load of each row's layer, or ``None``.
    """
    weight, count, equal = per_group
    layers, ranks = rank_load.shape
    per_rank = group_of.size // rank_load.size
    # min(max_units, UNITS_PER_REPLICA * k) >= MIN_UNITS_PER_REPLICA * k: k <= max_units / MIN.
    movable = (count >= 2) & (count <= max_units // MIN_UNITS_PER_REPLICA) & (weight > 0)
    # The load of one routing unit, where movable (few groups: the rest stay 0).
    multi = np.flatnonzero(movable)
    total_units = np.minimum(max_units, UNITS_PER_REPLICA * count.take(multi))
    unit = np.zeros(count.size)
    unit[multi] = weight.take(multi) / total_units
    mean = rank_load.sum(1) / ranks if layer_mean is None else layer_mean
    peak = rank_load.max(1)
    on_peak = group_of.reshape(layers, ranks, per_rank)[np.arange(layers), rank_load.argmax(1)]
    # The room must exceed a relative MIN_GAIN and one unit of the heaviest rank's coarsest
    # movable replica (rounding moves a rank by up to a unit of each replica it holds: a
    # smaller room would be lost again); 0 where it holds none (it cannot fall).
    least = unit.take(on_peak).max(1)
    spread = peak - mean
    # The room is at most peak - mean: this bound alone rules most layers that cannot gain out.
    able = spread > np.maximum(least, MIN_GAIN * peak)
    able &= least > 0.0
    if not able.any():
        return None
    heavy = rank_load >= (mean + (1.0 - HEAVY) * spread)[:, None]
    heavy &= able[:, None]
    # ``compress`` and ``bincount``: several times faster than a boolean index and a scatter.
    on_heavy = group_of.reshape(-1, per_rank).compress(heavy.ravel(), axis=0)
    candidate = np.bincount(on_heavy.ravel(), minlength=count.size) > 0
    candidate &= movable
    slot = np.flatnonzero(candidate.take(group_of))
    group = group_of.take(slot)
    # Each rank's least load: its load less what its movable replicas hold above one unit
    # (summed in slot order, as a pass over all slots with zeros for the others would).
    floor = rank_load - np.bincount(
        slot // per_rank, weights=equal.take(slot) - unit.take(group), minlength=rank_load.size
    ).reshape(layers, ranks)
    gains = peak - np.maximum(floor.max(1), mean) > np.maximum(least, MIN_GAIN * peak)
    if not gains.any():
        return None
    if not gains.all():
        candidate.reshape(layers, -1)[~gains] = False
        keep = gains.take(slot // (ranks * per_rank))
        slot, group = slot[keep], group[keep]
        # Layers that do not gain keep their equal split's loads (their slots do not move).
        floor = np.where(gains[:, None], floor, rank_load)
    # The groups with a movable slot, renumbered 0.. in their order: per-group arrays as long
    # as those groups, not all L * (E + 1) (far more where few slots move).
    kept = np.flatnonzero(candidate)
    dense = np.empty(count.size, dtype=np.int64)
    dense[kept] = np.arange(kept.size)
    kept_count = count.take(kept)
    kept_groups = (
        weight.take(kept),
        kept_count,
        np.minimum(max_units, UNITS_PER_REPLICA * kept_count),
        unit.take(kept),
    )
    return _Problem(slot, dense.take(group), kept_groups, floor, peak, per_rank)


def _warm_above(problem: _Problem, warm: np.ndarray) -> np.ndarray:
    """float64 [N]: each movable slot's load above one unit as the units ``warm`` (int64
    [L, R, S]) split its expert's load, at least 0 (a replica keeps one unit: the rest of its
    group is scaled down to keep the expert's load); the equal split's for an expert whose
    units are all 0."""
    group = problem.group
    given = warm.reshape(-1).take(problem.slot).astype(np.float64)
    total = np.bincount(group, weights=given, minlength=problem.size)
    above = given * (problem.weight / np.maximum(total, 1e-300)).take(group)
    above -= problem.unit
    np.maximum(above, 0.0, out=above)
    kept = np.bincount(group, weights=above, minlength=problem.size)
    above *= (problem.spare / np.maximum(kept, 1e-300)).take(group)
    return np.where((kept > 0.0).take(group), above, problem.above)


def _diffuse(
    problem: _Problem, start: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 [N] each movable slot's load above one unit after diffusion steps from ``start``
    (float64 [N], :func:`_warm_above`) or the equal split, float64 [L * R] the rank loads
    (numbered as ``_Problem.rank``) and [L] each layer's heaviest rank with them (step 1 of
    the module docstring): ``ITERATIONS`` at most, fewer once no layer's heaviest rank falls by
    a relative ``MIN_GAIN`` in a step, checked from the second step on (the first step from the
    equal split gains in every plan measured: its check would cost more than it saves)."""
    group, rank, size = problem.group, problem.rank, problem.size
    inverse = 1.0 / np.bincount(rank, minlength=problem.base.size).take(rank)
    # A slot moves by its group's level (the inverse-weighted mean) times its inverse. Each
    # group has 2+ slots with an inverse > 0: the sums are positive.
    pull = inverse / np.bincount(group, weights=inverse, minlength=size).take(group)
    above = problem.above.copy() if start is None else start
    loads = problem.rank_loads(above)  # [L * R], carried from one step to the next
    limit = problem.peak
    for step in range(ITERATIONS):
        ahead = loads.take(rank) * inverse
        move = np.bincount(group, weights=ahead, minlength=size).take(group) * pull
        move -= ahead
        above += move
        # Each step conserves every expert's load; it rarely takes a replica below one unit:
        # then the replica keeps one and the rest is rescaled so that the expert's load stays.
        if above.min() < 0.0:
            np.maximum(above, 0.0, out=above)
            total = np.bincount(group, weights=above, minlength=size)
            above *= (problem.spare / np.maximum(total, 1e-300)).take(group)
        loads = problem.rank_loads(above)
        peak = problem.peaks(loads)
        if step and not (peak < limit).any():
            break
        limit = peak * (1.0 - MIN_GAIN)
    return above, loads, peak


def _integer_units(
    problem: _Problem, above: np.ndarray, loads: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [N] whole units per movable slot for the loads above one unit ``above`` float64
    [N] (rank loads ``loads`` float64 [L * R], numbered as ``_Problem.rank``): the units each
    fills entirely (at least 1), the
    units left over to the slots whose rank is lightest with one more; divided by each group's
    gcd (step 2 of the module docstring). Also float64 [N]: each slot's load above one unit
    with them."""
    group, length = problem.group, problem.length
    whole = np.floor(above / problem.unit + 1e-9)  # units above the first
    left = problem.units - length - np.bincount(group, weights=whole, minlength=problem.size)
    # A slot's rank load with one more unit: the left-over units go to the lowest in each group.
    after = loads.take(problem.rank) - above + problem.unit * (whole + 1.0)
    order = _grouped_order(group, after)
    # In ``order`` the groups are ascending, ``length`` long: the first ``left`` of each gain.
    starts = np.cumsum(length) - length
    ordered = whole.take(order)
    ordered += np.arange(order.size) < np.repeat(starts + left, length)
    whole[order] = ordered
    rounded = problem.unit * whole
    units = ordered.astype(np.int64)
    units += 1
    # Floating-point slack could leave a group over its total: those keep the equal split.
    over = left < 0
    if over.any():
        units[np.repeat(over, length)] = 1
        slot_over = over.take(group)
        rounded[slot_over] = problem.above[slot_over]
    units //= np.repeat(np.gcd.reduceat(units, starts), length)
    slot_units = np.empty_like(units)
    slot_units[order] = units
    return slot_units, rounded


def _grouped_order(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """int64 [N]: indices sorting ``group`` int64 [N] (>= 0), then ``key`` float64 [N] (>= 0)
    within a group, then the index.

    Two stable radix passes (numpy's stable sort of uint16 is a radix sort, linear and many
    times faster than a lexsort): the key in 16 bits of the largest key, then the group. Keys
    closer than 2^-16 of the largest (a rank load; a routing unit weighs far more) count as
    equal.
    """
    if group.size and int(group.max()) > _UINT16_MAX:
        return np.lexsort((key, group))
    top = float(key.max(initial=0.0))
    scale = _UINT16_MAX / top if top > 0 else 0.0
    order = np.argsort((key * scale).astype(np.uint16), kind="stable")
    return order[np.argsort(group[order].astype(np.uint16), kind="stable")]


_UINT16_MAX = 2**16 - 1
