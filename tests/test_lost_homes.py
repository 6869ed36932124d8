"""Homes for a failed rank's lost experts (eplb/lost_homes.py) and the repair step that takes
them: one write per lost expert, each over a surplus replica, and where that reaches the
target the plan receives the fewest weights any plan can."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from elastic_ep import RankMapping, plan, plan_with_report
from elastic_ep.eplb import repair as repair_module
from elastic_ep.eplb.incremental import fill_missing
from elastic_ep.eplb.lost_homes import home_lost_experts
from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.unit_balance import balance_with_units


@st.composite
def failures(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(kept int64 [L, R - 1, S], load float64 [L, E]): a fresh plan without one of its ranks,
    full (no empty slot), some experts with no replica left; some zero loads."""
    layers = draw(st.integers(1, 3))
    ranks = draw(st.integers(3, 12))
    per_rank = draw(st.integers(2, 5))
    experts = draw(st.integers(per_rank, (ranks - 1) * per_rank))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    load = rng.lognormal(0.0, 1.0, (layers, experts)) * (rng.random((layers, experts)) > 0.1)
    slots = plan(load, ranks, per_rank, shares=False).phy2log.numpy()
    slots = slots.reshape(layers, ranks, per_rank)
    assume((slots >= 0).all())  # at most R replicas an expert: S > E leaves slots empty
    dead = draw(st.integers(0, ranks - 1))
    return np.delete(slots, dead, axis=1), load


@settings(max_examples=150, deadline=None)
@given(failures())
def test_each_lost_expert_takes_one_surplus_slot(case: tuple[np.ndarray, np.ndarray]) -> None:
    """Every expert placed, none twice on a rank; the only slots written are one per lost
    expert, each over a replica whose expert keeps another."""
    kept, load = case
    layers, ranks, per_rank = kept.shape
    experts = load.shape[1]
    units = solve_shares(kept, load, max_units(ranks * per_rank, experts))
    _, slot_load = balance_with_units(kept, load, units)
    out = home_lost_experts(kept, load, slot_load)
    before, after = expert_counts(kept, experts), expert_counts(out, experts)
    assert (after >= 1).all()
    for layer in range(layers):
        for rank in out[layer]:
            assert len(set(rank.tolist())) == per_rank
        written = np.argwhere(out[layer] != kept[layer])
        lost = set(np.flatnonzero(before[layer] == 0).tolist())
        assert sorted(out[layer][tuple(written.T)].tolist()) == sorted(lost)
        evicted = kept[layer][tuple(written.T)]
        assert (before[layer][evicted] >= 2).all()


def test_a_lost_expert_takes_the_best_single_write() -> None:
    """Lost expert 5 (load 2) over a surplus replica of expert 2 (three replicas) or 3 (two):
    the rule's slot reaches the best balancedness any one write does (0.846). Over expert 2's
    replica on the lightest rank, rank 1, it reaches 0.807: rank 1 keeps only expert 3's
    replica to pass load on; on rank 0, 0.697: rank 0 keeps only its single-replica experts."""
    kept = np.array([[[0, 1, 2], [2, 3, 4], [2, 3, 6]]])
    load = np.array([[5.0, 4.0, 6.0, 2.0, 1.0, 2.0, 3.0]])
    most = max_units(9, 7)

    def balance(slots: np.ndarray) -> float:
        return float(balance_with_units(slots, load, solve_shares(slots, load, most))[0][0])

    _, slot_load = balance_with_units(kept, load, solve_shares(kept, load, most))
    out = home_lost_experts(kept, load, slot_load)
    options = []
    for rank, slot in np.argwhere(np.isin(kept[0], [2, 3])):
        option = kept.copy()
        option[0, rank, slot] = 5
        options.append(balance(option))
    assert balance(out) == pytest.approx(max(options))
    assert sorted(round(b, 3) for b in options) == [0.697, 0.807, 0.846, 0.846, 0.846]


def test_a_failure_receives_only_its_lost_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """64 experts on 32 ranks x 3 slots (4 layers), rank 17 fails: its lost experts homed where
    their pools make room reach the target, one weight per lost expert (8; the step-1 fill and
    the swaps after it received 28)."""
    rng = np.random.default_rng(0)
    profile = 1000.0 / np.arange(1, 65) ** 1.1
    load = np.stack([rng.permutation(profile) for _ in range(4)])
    previous = plan(load, 32, 3)
    dead = [17]
    mapping = RankMapping.without(32, dead)
    lost = int(
        (
            expert_counts(np.delete(previous.phy2log.numpy().reshape(4, 32, 3), dead, 1), 64) == 0
        ).sum()
    )
    report = plan_with_report(load, 31, 3, previous=previous, rank_mapping=mapping, dead_ranks=dead)
    assert int(report.transfers.sum()) == lost > 0
    assert bool(report.repaired.all())

    # Without the homes (the step-1 fill in their place), the ladder receives more.
    def step_one_fill(kept: np.ndarray, load: np.ndarray, _: np.ndarray) -> np.ndarray:
        out = kept.copy()
        ranks, per_rank = kept.shape[1:]
        counts = replica_counts(load, ranks * per_rank, ranks)
        fill_missing(out, load, counts, np.zeros(kept.shape[0], dtype=np.int64))
        return out

    monkeypatch.setattr(repair_module, "home_lost_experts", step_one_fill)
    without = plan_with_report(
        load, 31, 3, previous=previous, rank_mapping=mapping, dead_ranks=dead
    )
    assert int(without.transfers.sum()) > lost
