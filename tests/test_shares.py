"""Routing shares: ``Placement.units``, their routing rows, and the planner's share solver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping
from elastic_ep.eplb import EMPTY, Placement, PlacementBuffers, plan, plan_with_report
from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.shares import _grouped_order, solve_shares
from elastic_ep.moe import route_to_slots


def random_units(phy2log: np.ndarray, experts: int, seed: int, most: int = 5) -> np.ndarray:
    """int64 like ``phy2log``: 1..most units per occupied slot, 0 on empty ones; an expert over
    ``max_units`` gets all ones back."""
    layers, slots = phy2log.shape
    units = np.where(
        phy2log >= 0, np.random.default_rng(seed).integers(1, most + 1, phy2log.shape), 0
    )
    bound = max_units(slots, experts)
    for layer in range(layers):
        for expert in range(experts):
            mine = phy2log[layer] == expert
            if units[layer, mine].sum() > bound:
                units[layer, mine] = 1
    return units.astype(np.int64)


@st.composite
def shared_placements(draw: st.DrawFn) -> Placement:
    """Placements with routing shares: -1 slots, duplicates on a rank, missing experts."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 8))
    ranks = draw(st.integers(1, 5))
    per_rank = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    phy2log = np.random.default_rng(seed).integers(EMPTY, experts, (layers, ranks * per_rank))
    units = random_units(phy2log, experts, seed + 1, draw(st.integers(1, 6)))
    return Placement(torch.from_numpy(phy2log), experts, ranks, units=torch.from_numpy(units))


@settings(max_examples=150, deadline=None)
@given(shared_placements())
def test_rows_hold_each_slot_once_per_unit_interleaved(placement: Placement) -> None:
    units, phy2log = placement.units, placement.phy2log
    assert bool((units[phy2log >= 0] >= 1).all()) and bool((units[phy2log < 0] == 0).all())
    for layer in range(placement.num_layers):
        for expert in range(placement.num_logical):
            mine = (phy2log[layer] == expert).nonzero().flatten()
            total = int(units[layer, mine].sum())
            assert int(placement.logcnt[layer, expert]) == total
            assert int(placement.replicas[layer, expert]) == mine.numel()
            row = placement.log2phy[layer, expert]
            assert bool((row[total:] == EMPTY).all())
            entries = row[:total].tolist()
            assert sorted(entries) == sorted(
                slot for slot in mine.tolist() for _ in range(int(units[layer, slot]))
            )
            # Interleaved: copy j of slot p at key (j + 1/2) / units[p], rows in key order.
            seen: dict[int, int] = {}
            keys = []
            for slot in entries:
                keys.append((seen.get(slot, 0) + 0.5) / int(units[layer, slot]))
                seen[slot] = seen.get(slot, 0) + 1
            assert keys == sorted(keys)


@settings(max_examples=100, deadline=None)
@given(shared_placements(), st.integers(0, 200), st.integers(0, 9), st.integers(0, 2**16))
def test_routing_gives_each_slot_its_entries_counts(
    placement: Placement, pairs: int, offset: int, seed: int
) -> None:
    """route_to_slots over a row with repeats: a slot gets the pairs of all its entries, and
    any batch of n pairs gives a slot of u of U units n * u / U pairs within 1 + k * u / U
    (k replicas; the interleaving's bound)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, placement.num_logical, (pairs, 1), generator=gen)
    for layer in range(placement.num_layers):
        row, count = placement.log2phy[layer], placement.logcnt[layer]
        slots = route_to_slots(ids, row, count, rank_offset=offset)
        got = torch.bincount(slots[slots >= 0], minlength=placement.num_slots)
        for expert in range(placement.num_logical):
            n, total = int((ids == expert).sum()), int(count[expert])
            if total == 0:
                continue
            per_entry = torch.tensor([(n - i + total - 1) // total for i in range(total)])
            per_entry = per_entry.roll(offset % total)  # entry i gets pairs j with (j+off)%U == i
            k = int(placement.replicas[layer, expert])
            for slot in row[expert, :total].unique().tolist():
                want = int(per_entry[row[expert, :total] == slot].sum())
                assert int(got[slot]) == want
                u = int(placement.units[layer, slot])
                assert abs(want - n * u / total) <= 1 + k * u / total + 1e-9


@settings(max_examples=100, deadline=None)
@given(shared_placements(), st.integers(0, 2**16))
def test_shares_weight_rank_loads_and_move_no_weights(placement: Placement, seed: int) -> None:
    load = torch.from_numpy(np.random.default_rng(seed).lognormal(0, 1, placement.logcnt.shape))
    loads = placement.rank_loads(load)
    placed = placement.logcnt > 0
    assert torch.allclose(loads.sum(1), (load * placed).sum(1))  # load conserved
    per_unit = load / placement.logcnt.clamp(min=1)
    for layer in range(placement.num_layers):
        for rank in range(placement.num_ranks):
            s = placement.slots_per_rank
            want = sum(
                float(per_unit[layer, e]) * int(placement.units[layer, rank * s + i])
                for i, e in enumerate(placement.local_slots(rank)[layer].tolist())
                if e >= 0
            )
            assert float(loads[layer, rank]) == pytest.approx(want)
    equal = Placement(placement.phy2log, placement.num_logical, placement.num_ranks)
    assert int(placement.transfers_from(equal).sum()) == 0
    assert int(equal.transfers_from(placement).sum()) == 0
    assert (placement == equal) == (not placement.has_shares)


def test_bad_units_are_refused_clearly() -> None:
    phy2log = torch.tensor([[0, 1, -1, 0]])
    with pytest.raises(ValueError, match=r"units\[0, 2\] = 1: .* empty one 0"):
        Placement(phy2log, 2, 2, units=torch.tensor([[1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"units\[0, 1\] = 0: an occupied slot needs >= 1"):
        Placement(phy2log, 2, 2, units=torch.tensor([[1, 0, 0, 1]]))
    with pytest.raises(TypeError, match="units must be int64"):
        Placement(phy2log, 2, 2, units=torch.tensor([[1.0, 1, 0, 1]]))
    with pytest.raises(TypeError, match="units must be int64"):
        Placement(phy2log, 2, 2, units=torch.tensor([1, 1, 0, 1]))
    bound = max_units(4, 2)
    with pytest.raises(ValueError, match=f"expert 0 has {bound + 1} routing units"):
        Placement(phy2log, 2, 2, units=torch.tensor([[bound, 1, 0, 1]]))
    Placement(phy2log, 2, 2, units=torch.tensor([[bound - 1, 1, 0, 1]]))


def test_buffers_refuse_a_row_they_cannot_hold() -> None:
    phy2log = torch.tensor([[0, 1, 0, 2]])  # 4 slots, 3 experts: max_units = 32 * 2 = 64
    shared = Placement(phy2log, 3, 2, units=torch.tensor([[40, 1, 20, 1]]))
    narrow = PlacementBuffers(1, 3, 4 / 3, share_factor=1)  # rows of max_replicas = 2
    before = narrow.log2phy.clone()
    with pytest.raises(ValueError, match="60 routing units, but a log2phy row holds at most 2"):
        narrow.update_(shared)
    assert torch.equal(narrow.log2phy, before)
    wide = PlacementBuffers(1, 3, 4 / 3)
    assert wide.row_width == max_units(4, 3)
    wide.update_(shared)
    assert torch.equal(wide.log2phy[:, :, :60], shared.log2phy)
    assert torch.equal(wide.logcnt, shared.logcnt)


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int, int]:
    experts = draw(st.integers(2, 24))
    ranks = draw(st.integers(1, 12))
    per_rank = draw(st.integers(-(-experts // ranks), -(-experts // ranks) + 4))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    load = rng.permutation(1000.0 / np.arange(1, experts + 1) ** draw(st.floats(0.0, 2.0)))
    load = np.stack([rng.permutation(load) * rng.lognormal(0, 0.3, experts) for _ in range(layers)])
    load[:, rng.random(experts) < 0.1] = 0.0  # experts without load
    nodes = draw(st.sampled_from([1, 2])) if ranks % 2 == 0 and experts % 2 == 0 else 1
    if nodes == 2 and ranks // 2 * per_rank < experts // 2:
        nodes = 1
    return load, ranks, per_rank, nodes, seed


@settings(max_examples=120, deadline=None)
@given(problems())
def test_plans_with_shares_are_valid_and_never_worse(
    problem: tuple[np.ndarray, int, int, int, int],
) -> None:
    load, ranks, per_rank, nodes, _ = problem
    weights = torch.from_numpy(load)
    groups = 2 if nodes == 2 else 1
    shared = plan(load, ranks, per_rank, num_groups=groups, num_nodes=nodes)
    equal = plan(load, ranks, per_rank, num_groups=groups, num_nodes=nodes, shares=False)
    assert torch.equal(shared.phy2log, equal.phy2log)  # shares move no weights
    Placement(shared.phy2log, shared.num_logical, ranks, units=shared.units)  # valid units
    shared.validate(distinct_ranks=True)
    assert shared.balancedness(weights) >= equal.balancedness(weights) - 1e-12
    assert bool(
        (
            shared.rank_loads(weights).max(1).values
            <= equal.rank_loads(weights).max(1).values * (1 + 1e-12)
        ).all()
    )
    buffers = PlacementBuffers(
        shared.num_layers, shared.num_logical, shared.num_slots / shared.num_logical
    )
    buffers.update_(shared)  # rows fit the buffers sized for the slots
    assert torch.equal(buffers.logcnt, shared.logcnt)


@settings(max_examples=60, deadline=None)
@given(problems(), st.data())
def test_movement_aware_plans_reach_the_fresh_plan_with_shares(
    problem: tuple[np.ndarray, int, int, int, int], data: st.DataObject
) -> None:
    """The repair measures its layers with routing shares: the model ends within twice the
    tolerance (a kept near miss) of the fresh plan with shares and each layer within 4x (one
    the other layers' surplus pays for), its units never below the equal split of its own
    slots, and the transfers it reports are the ones its slots need."""
    load, ranks, per_rank, _, seed = problem
    previous = plan(load, ranks, per_rank)
    drifted = load * np.random.default_rng(seed + 1).lognormal(0, 0.3, load.shape)
    grow = data.draw(st.integers(0, 2))
    mapping = RankMapping.resize(ranks, ranks + grow)
    kwargs = dict(previous=previous, rank_mapping=mapping)
    shared = plan_with_report(drifted, ranks + grow, per_rank, **kwargs)  # type: ignore[arg-type]
    placement = shared.placement
    placement.validate(distinct_ranks=True)
    assert torch.equal(shared.transfers, placement.transfers_from(previous, mapping).sum(1))
    weights = torch.from_numpy(drifted)
    fresh = plan(drifted, ranks + grow, per_rank)
    even = Placement(placement.phy2log, placement.num_logical, placement.num_ranks)
    mean, fresh_mean = placement.balancedness(weights), fresh.balancedness(weights)
    assert mean >= fresh_mean - 0.02 - 1e-9
    for layer in range(load.shape[0]):
        row = weights[layer : layer + 1]
        mine = _one_layer(placement, layer).balancedness(row)
        assert mine >= _one_layer(fresh, layer).balancedness(row) - 0.04 - 1e-9
        assert mine >= _one_layer(even, layer).balancedness(row) - 1e-12


def _one_layer(placement: Placement, layer: int) -> Placement:
    return Placement(
        placement.phy2log[layer : layer + 1],
        placement.num_logical,
        placement.num_ranks,
        placement.units[layer : layer + 1],
    )


def test_solver_moves_load_off_the_heaviest_rank() -> None:
    """Expert 0 (load 6) on ranks 0 and 1; rank 0 also holds expert 1 (load 2): the equal split
    gives 5 and 3, shares give 4 and 4 within one routing unit (6 / 64)."""
    slots = np.array([[[0, 1], [0, 2]]])
    load = np.array([[6.0, 2.0, 0.0]])
    units = solve_shares(slots, load, max_units(4, 3))
    assert units[0, 0, 1] == units[0, 1, 1] == 1
    assert units[0, 0, 0] + units[0, 1, 0] == 64  # max_units(4, 3) = 64
    placement = Placement(
        torch.from_numpy(slots.reshape(1, -1)), 3, 2, units=torch.from_numpy(units.reshape(1, -1))
    )
    loads = placement.rank_loads(torch.from_numpy(load))
    assert torch.allclose(loads, torch.full((1, 2), 4.0, dtype=torch.float64), atol=6 / 64)
    one_slot = np.array([[[0], [0], [1]]])
    assert (solve_shares(one_slot, np.array([[5.0, 1.0]]), 8) == 1).all()  # nothing to move


def test_a_node_is_measured_against_its_layers_mean() -> None:
    """A node's ranks 60 and 59 (expert 0, load 100, on both): against the node's own mean the
    room (0.5) is under one routing unit of expert 0 (100 / 128) and the split stays even;
    against the layer's mean (30: the layer's other nodes are light) the node holds the
    layer's heaviest rank, and shares lower it."""
    slots = np.array([[[0, 1], [0, 2]]])
    load = np.array([[100.0, 10.0, 9.0]])
    assert (solve_shares(slots, load, 1024) == 1).all()
    units = solve_shares(slots, load, 1024, mean=np.array([30.0]))
    assert units[0, 0, 1] == units[0, 1, 1] == 1
    assert units[0, 0, 0] + units[0, 1, 0] == 128
    share = units[0, :, 0] / 128 * 100.0
    peak = max(share[0] + 10.0, share[1] + 9.0)
    assert 59.5 <= peak < 60.0


@settings(max_examples=80, deadline=None)
@given(problems(), st.floats(0.0, 1.5))
def test_shares_against_any_mean_never_raise_a_rows_heaviest_rank(
    problem: tuple[np.ndarray, int, int, int, int], scale: float
) -> None:
    """Whatever mean each row is measured against, its units are valid (0 for an empty slot,
    >= 1 elsewhere, at most ``most`` per expert) and its heaviest rank stays at or under the
    equal split's."""
    load, ranks, per_rank, nodes, _ = problem
    slots = plan(load, ranks, per_rank, num_groups=nodes, num_nodes=nodes, shares=False)
    held = slots.phy2log.numpy().reshape(load.shape[0], ranks, per_rank)
    most = max_units(ranks * per_rank, load.shape[1])
    mean = scale * load.sum(1) / ranks
    units = solve_shares(held, load, most, mean=mean)
    assert ((units == 0) == (held < 0)).all() and (units[held >= 0] >= 1).all()
    for layer in range(load.shape[0]):
        per_expert = np.bincount(held[layer].ravel() + 1, units[layer].ravel(), load.shape[1] + 1)
        assert per_expert[1:].max() <= most
        even = np.where(held[layer] >= 0, 1.0, 0.0)
        assert _peak(held[layer], load[layer], units[layer]) <= _peak(
            held[layer], load[layer], even
        ) * (1 + 1e-12)


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(0, 2**16))
def test_shares_from_any_start_never_raise_a_rows_heaviest_rank(
    problem: tuple[np.ndarray, int, int, int, int], seed: int
) -> None:
    """Started from any units (``warm``: 0-64 per occupied slot, whatever their totals; an
    expert whose slots all have 0 starts from the equal split: all zeros give the cold solve's
    units), the solve gives valid units and no row's heaviest rank above the equal split's;
    started from its own answer, no row's heaviest rank above that answer's by more than a
    rank's slots times the row's coarsest routing unit (the diffusion only lowers the heaviest
    rank; rounding moves a rank by up to a unit of each replica it holds)."""
    load, ranks, per_rank, nodes, _ = problem
    slots = plan(load, ranks, per_rank, num_groups=nodes, num_nodes=nodes, shares=False)
    held = slots.phy2log.numpy().reshape(load.shape[0], ranks, per_rank)
    most = max_units(ranks * per_rank, load.shape[1])
    start = np.where(held >= 0, np.random.default_rng(seed).integers(0, 65, held.shape), 0)
    units = solve_shares(held, load, most, warm=start)
    assert ((units == 0) == (held < 0)).all() and (units[held >= 0] >= 1).all()
    cold = solve_shares(held, load, most)
    assert (solve_shares(held, load, most, warm=np.zeros_like(held)) == cold).all()
    again = solve_shares(held, load, most, warm=cold)
    for layer in range(load.shape[0]):
        row, weight = held[layer], load[layer]
        per_expert = np.bincount(row.ravel() + 1, units[layer].ravel(), weight.size + 1)
        assert per_expert[1:].max() <= most
        even = _peak(row, weight, np.where(row >= 0, 1.0, 0.0))
        assert _peak(row, weight, units[layer]) <= even * (1 + 1e-12)
        assert _peak(row, weight, again[layer]) <= even * (1 + 1e-12)
        total = np.bincount(row.ravel() + 1, cold[layer].ravel(), weight.size + 1)[1:]
        coarsest = (weight / np.maximum(total, 1))[total >= 2].max(initial=0.0)
        slack = per_rank * coarsest + 1e-9
        assert _peak(row, weight, again[layer]) <= _peak(row, weight, cold[layer]) + slack


def _peak(slots: np.ndarray, load: np.ndarray, units: np.ndarray) -> float:
    """The heaviest rank of ``slots`` int64 [R, S] with ``units`` [R, S] for ``load`` [E]."""
    total = np.bincount(slots.ravel() + 1, units.ravel(), load.size + 1)[1:]
    share = np.where(slots >= 0, units / np.maximum(total, 1e-300)[slots], 0.0)
    return float((share * load[slots]).sum(1).max())


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 400),
    st.sampled_from([4, 1000, 70_000]),
    st.integers(0, 2**16),
)
def test_left_over_units_go_in_group_then_key_order(size: int, groups: int, seed: int) -> None:
    """The order of the left-over units: every index once, groups ascending, keys ascending
    within a group (to 2^-16 of the largest key; exact, as a lexsort, for group ids past 16
    bits)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, groups, size)
    key = rng.choice([0.0, 1.0, 2.5], size) if seed % 3 == 0 else rng.random(size) * 7.0
    order = _grouped_order(group, key)
    assert np.array_equal(np.sort(order), np.arange(size))
    grouped, keyed = group[order], key[order]
    assert (np.diff(grouped) >= 0).all()
    same = grouped[1:] == grouped[:-1]
    slack = 2.0**-16 * key.max() if groups <= 2**16 else 0.0
    assert (keyed[1:][same] >= keyed[:-1][same] - slack).all()
    if groups > 2**16:
        assert np.array_equal(order, np.lexsort((key, group)))
