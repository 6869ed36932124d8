"""The fresh plan's faster forms against the plain forms they replace (hypothesis).

* pair swaps in the slot-major layout (``packing._pair_swaps``, int16 ids) against the
  row-major form (one row of ``[B * R, S]`` per rank, a presence table per step);
* ``shares._movable`` (unit loads and caps only for the movable groups, each rank's least load
  summed over the movable slots) against passes over every group and slot;
* ``replication._largest`` (a cutoff without ties read off in one comparison) against the
  cutoff, ties broken by ``tie_order``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import packing, replication, shares
from elastic_ep.eplb.replication import ascending_order, replica_counts
from tests.test_planner_steps import swap_rows


def _row_major_pair_swaps(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    ranks: int,
    pairs: int,
    max_steps: int,
    floor: np.ndarray | None,
) -> None:
    """The pair swaps on ``slots`` int64 / ``weight`` float64 [B * R, S], ``loads`` float64
    [B * R] (in place): the k heaviest ranks of each row with the k lightest, the best swap of
    each pair (a no-op where it does not lower the pair's larger load)."""
    per_rank = slots.shape[1]
    cells = (slots.reshape(-1), weight.reshape(-1))
    by_row = loads.reshape(-1, ranks)
    active = np.arange(by_row.shape[0])
    cols = int(slots.max()) + 2
    table_row = (np.arange(2 * by_row.shape[0] * pairs) * cols + 1)[:, None]
    for _ in range(max_steps):
        if floor is not None:
            active = active[by_row[active].max(1) > floor[active]]
        if active.size == 0:
            return
        by_load = ascending_order(by_row[active]) + (active * ranks)[:, None]
        heavy = by_load[:, : -pairs - 1 : -1].ravel()
        light = by_load[:, :pairs].ravel()
        heavy_row, light_row = table_row[: heavy.size], table_row[heavy.size : 2 * heavy.size]
        heavy_x, light_x = slots[heavy], slots[light]
        heavy_load = loads[heavy]
        half_gap = 0.5 * (heavy_load - loads[light])
        held = np.zeros(2 * heavy.size * cols, dtype=bool)
        held[heavy_x + heavy_row] = True
        held[light_x + light_row] = True
        heavy_w = np.where(held[heavy_x + light_row], -np.inf, weight[heavy] - half_gap[:, None])
        light_w = np.where(held[light_x + heavy_row] & (light_x >= 0), np.inf, weight[light])
        flat = np.abs(heavy_w[:, :, None] - light_w[:, None, :]).reshape(heavy.size, -1)
        best = flat.argmin(1)
        chosen = flat[np.arange(heavy.size), best]
        improved = heavy_load - half_gap + chosen < heavy_load * (1 - 1e-12)
        h_slot, l_slot = np.divmod(best, per_rank)
        h_cell = heavy * per_rank + h_slot
        l_cell = np.where(improved, light * per_rank + l_slot, h_cell)
        moved = cells[1][h_cell] - cells[1][l_cell]
        loads[heavy] -= moved
        loads[light] += moved
        for table in cells:
            values = table[h_cell]
            table[h_cell] = table[l_cell]
            table[l_cell] = values
        active = active[improved[::pairs]]


def _zipf_rows(rng: np.random.Generator, rows: int, experts: int, kind: str) -> np.ndarray:
    """float64 [rows, experts] of one of the tests' load kinds (ties in the integer ones)."""
    if kind == "small integers":
        return rng.integers(0, 4, (rows, experts)).astype(np.float64)
    if kind == "lognormal":
        return rng.lognormal(0, 1.5, (rows, experts))
    profile = 1000.0 / np.arange(1, experts + 1) ** 1.2
    return np.stack([rng.permutation(profile) for _ in range(rows)])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 9),
    st.integers(2, 6),
    st.integers(1, 54),
    st.integers(0, 9),
    st.booleans(),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf"]),
)
def test_slot_major_pair_swaps_match_row_major(
    rows: int,
    ranks: int,
    per_rank: int,
    experts: int,
    steps: int,
    floored: bool,
    seed: int,
    kind: str,
) -> None:
    """Rounds, then swaps in the slot-major layout, give the row-major form's slots, slot loads
    and rank loads exactly, for any number of pairs, steps and with or without a floor (empty
    slots where fewer than S experts leave some)."""
    rng = np.random.default_rng(seed)
    experts = min(experts, ranks * per_rank)
    load = _zipf_rows(rng, rows, experts, kind)
    counts = replica_counts(load, ranks * per_rank, ranks)
    items, weight = packing.sorted_replicas(counts, load / counts, ranks * per_rank)
    pairs = int(rng.integers(1, ranks // 2 + 1))
    floor = load.sum(1) / ranks * rng.uniform(0.9, 1.1, rows) if floored else None

    slots, slot_weight, rank_load = packing.pack_rounds(items, weight, ranks)
    expected = (slots.reshape(-1, per_rank), slot_weight.reshape(-1, per_rank), rank_load.ravel())
    _row_major_pair_swaps(*expected, ranks, pairs, steps, floor)

    by_slot, by_slot_weight, loads = packing._deal(items, weight, ranks)
    packing._pair_swaps(by_slot, by_slot_weight, loads, ranks, pairs, steps, floor)
    assert by_slot.dtype == np.int16
    assert np.array_equal(by_slot.T, expected[0])
    assert np.array_equal(by_slot_weight.T, expected[1])
    assert np.array_equal(loads, expected[2])


@settings(max_examples=200, deadline=None)
@given(swap_rows(max_ranks=8), st.integers(1, 4), st.integers(1, 6))
def test_pair_swaps_with_empty_slots_match_row_major(
    row: tuple[np.ndarray, np.ndarray], pairs: int, steps: int
) -> None:
    """``improve_by_swaps(pairs=k)`` (slot-major inside) on rows with empty slots and any
    experts per rank gives the row-major form's slots and loads exactly."""
    slots, weight = row
    pairs = min(pairs, slots.shape[0] // 2)
    expected = (slots.copy(), weight.copy(), weight.sum(1))
    _row_major_pair_swaps(*expected, slots.shape[0], pairs, steps, None)
    new_slots, new_weight = slots[None].copy(), weight[None].copy()
    packing.improve_by_swaps(new_slots, new_weight, max_steps=steps, pairs=pairs)
    assert np.array_equal(new_slots[0], expected[0])
    assert np.array_equal(new_weight[0], expected[1])


def _plain_movable(
    slots: np.ndarray, load: np.ndarray, most: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The movable slots (flat indices into [L, R, S]) and the rank loads with one unit per
    movable replica, float64 [L, R], by passes over every group and slot (``None``: none)."""
    layers, ranks, per_rank = slots.shape
    experts = load.shape[1]
    group_of = (slots + np.arange(1, layers * (experts + 1), experts + 1)[:, None, None]).ravel()
    count = np.bincount(group_of, minlength=layers * (experts + 1))
    weight = np.zeros((layers, experts + 1))
    weight[:, 1:] = load
    weight = weight.ravel()
    total_units = np.minimum(most, shares.UNITS_PER_REPLICA * count)
    equal = weight / np.maximum(count, 1)
    rank_load = shares._sum_slots(equal[group_of].reshape(layers, ranks, per_rank))
    movable = (count >= 2) & (total_units >= shares.MIN_UNITS_PER_REPLICA * count) & (weight > 0)
    unit = weight / np.maximum(total_units, 1)
    mean, peak = rank_load.sum(1) / ranks, rank_load.max(1)
    on_peak = group_of.reshape(layers, ranks, per_rank)[np.arange(layers), rank_load.argmax(1)]
    least = np.where(movable[on_peak], unit[on_peak], 0.0).max(1)
    spread = peak - mean
    able = (spread > np.maximum(least, shares.MIN_GAIN * peak)) & (least > 0.0)
    if not able.any():
        return None
    heavy = (rank_load >= (mean + (1.0 - shares.HEAVY) * spread)[:, None]) & able[:, None]
    on_heavy = group_of.reshape(-1, per_rank)[heavy.ravel()]
    candidate = (np.bincount(on_heavy.ravel(), minlength=count.size) > 0) & movable
    lift = np.where(candidate, equal - unit, 0.0)[group_of]
    floor = rank_load - shares._sum_slots(lift.reshape(layers, ranks, per_rank))
    gains = peak - np.maximum(floor.max(1), mean) > np.maximum(least, shares.MIN_GAIN * peak)
    if not gains.any():
        return None
    candidate.reshape(layers, -1)[~gains] = False
    floor = np.where(gains[:, None], floor, rank_load)
    return np.flatnonzero(candidate[group_of]), floor


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 9),
    st.integers(2, 5),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf"]),
    st.sampled_from([64, 100, 256, 1024]),
)
def test_movable_slots_match_passes_over_every_slot(
    layers: int, ranks: int, per_rank: int, seed: int, kind: str, most: int
) -> None:
    """``_movable`` finds the slots and the rank loads with one unit per movable replica that
    passes over every group and slot find, bit for bit."""
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(1, ranks * per_rank + 1))
    load = _zipf_rows(rng, layers, experts, kind)
    slots = packing.static_slots(load, ranks, per_rank, int(rng.integers(0, 9)))
    expected = _plain_movable(slots, load, most)
    group_of = (slots + np.arange(1, layers * (experts + 1), experts + 1)[:, None, None]).ravel()
    count = np.bincount(group_of, minlength=layers * (experts + 1))
    weight = np.zeros((layers, experts + 1))
    weight[:, 1:] = load
    weight = weight.ravel()
    equal = (weight / np.maximum(count, 1))[group_of]
    rank_load = shares._sum_slots(equal.reshape(layers, ranks, per_rank))
    problem = shares._movable(group_of, rank_load, (weight, count, equal), most)
    if expected is None:
        assert problem is None
        return
    assert problem is not None
    slot, floor = expected
    assert np.array_equal(problem.slot, slot)
    layer, rank = np.divmod(slot // per_rank, ranks)
    if problem.rank_major:  # rank * L + layer
        assert np.array_equal(problem.rank, rank * layers + layer)
        assert np.array_equal(problem.base, floor.T.ravel())
    else:
        assert np.array_equal(problem.rank, layer * ranks + rank)
        assert np.array_equal(problem.base, floor.ravel())


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 40),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf"]),
)
def test_largest_matches_cutoff_and_ties(rows: int, width: int, seed: int, kind: str) -> None:
    """``_largest`` picks exactly the wanted largest priorities per row, of equal ones at the
    cutoff the lowest ``tie_order`` first (checked row by row with a stable sort)."""
    rng = np.random.default_rng(seed)
    priority = _zipf_rows(rng, rows, width, kind)
    wanted = rng.integers(1, width + 1, rows)
    order = rng.permutation(width)
    chosen = replication._largest(priority, wanted, lambda: order)
    for row in range(rows):
        # Highest priority first, then the lowest tie order.
        ranked = np.lexsort((order, -priority[row]))
        expected = np.zeros(width, dtype=bool)
        expected[ranked[: wanted[row]]] = True
        assert np.array_equal(chosen[row], expected)


def test_pair_swaps_keep_wide_ids() -> None:
    """With R * S >= 2^15 slots per row the slot-major ids stay int64."""
    load = np.random.default_rng(0).lognormal(0, 1, (1, 40_000))
    slots = packing.static_slots(load, 4096, 10, 1)
    assert slots.dtype == np.int64
    assert np.array_equal(np.unique(slots[slots >= 0]), np.arange(40_000))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 9),
    st.integers(2, 5),
    st.integers(0, 2**16),
    st.sampled_from(["lognormal", "small integers", "zipf"]),
)
def test_shares_per_slot_and_per_group_loads_agree(
    layers: int, ranks: int, per_rank: int, seed: int, kind: str
) -> None:
    """Experts that hold no slot change no unit: with enough of them that groups outnumber
    slots (each slot's equal-split load divided per slot), the units are those of the plan
    without them (divided per group)."""
    rng = np.random.default_rng(seed)
    experts = int(rng.integers(1, ranks * per_rank + 1))
    load = _zipf_rows(rng, layers, experts, kind)
    slots = packing.static_slots(load, ranks, per_rank, int(rng.integers(0, 9)))
    unplaced = np.zeros((layers, 2 * ranks * per_rank))
    for most in (64, 256, 1024):
        assert np.array_equal(
            shares.solve_shares(slots, np.hstack([load, unplaced]), most),
            shares.solve_shares(slots, load, most),
        )
