"""Fewer rounds of the shares-aware repair ladder (eplb/repair.py): drift rows of step 2 double
their swap steps from round DRIFT_DOUBLE_FROM, and a step-3 row whose round raised it by less
than STEP3_STALL of the way left goes on to step 4."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from elastic_ep import RankMapping, plan, plan_with_report
from elastic_ep.eplb import repair as repair_module
from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.unit_balance import balance_with_units


def _zipf_load(layers: int, experts: int, seed: int) -> np.ndarray:
    """float64 [layers, experts]: a Zipf profile permuted per layer."""
    rng = np.random.default_rng(seed)
    profile = 1000.0 / np.arange(1, experts + 1) ** 1.1
    return np.stack([rng.permutation(profile) for _ in range(layers)])


def _counted(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """The row counts of every call of repair's ``name`` from now on."""
    calls: list[int] = []
    inner = getattr(repair_module, name)

    def counted(slots: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        calls.append(slots.shape[0])
        return inner(slots, *args, **kwargs)

    monkeypatch.setattr(repair_module, name, counted)
    return calls


def _drift(monkeypatch: pytest.MonkeyPatch, double_from: int) -> tuple[int, float, float]:
    """Solves, share of the slots moved and share of the fresh plan's gain kept for a 10%
    drift of 16 layers x 256 experts on 32 ranks x 9 slots."""
    monkeypatch.setattr(repair_module, "DRIFT_DOUBLE_FROM", double_from)
    layers, experts, ranks, per_rank = 16, 256, 32, 9
    load = _zipf_load(layers, experts, 0)
    base = plan(load, ranks, per_rank)
    now = load * np.random.default_rng(1).lognormal(0.0, 0.1, load.shape)
    calls = _counted(monkeypatch, "solve_shares")
    report = plan_with_report(
        now, ranks, per_rank, previous=base, rank_mapping=RankMapping.identity(ranks)
    )
    moved = float(report.transfers.sum()) / (layers * ranks * per_rank)
    fresh = float(plan(now, ranks, per_rank).balancedness(now))
    was = float(base.balancedness(now))
    kept = (float(report.placement.balancedness(now)) - was) / (fresh - was)
    monkeypatch.undo()
    return len(calls), moved, kept


def test_drift_doubles_its_steps_in_fewer_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Doubling the drift rows' steps takes fewer solves than one step per round, and keeps the
    drift targets: at most 15% of the slots moved, at least 90% of the fresh plan's gain."""
    solves, moved, kept = _drift(monkeypatch, repair_module.DRIFT_DOUBLE_FROM)
    single, _, _ = _drift(monkeypatch, 10**9)
    assert solves < single
    assert moved <= 0.15
    assert kept >= 0.9


def _scale_down(monkeypatch: pytest.MonkeyPatch, stall: float) -> tuple[int, float]:
    """Solves and balancedness for 60 layers x 384 experts on 256 -> 224 ranks x 5 slots, the
    load unchanged (58 x 256 on 128 -> 112 x 5 crept until step 3's solves started from the
    units of the round before; it now reaches its target in its first round)."""
    monkeypatch.setattr(repair_module, "STEP3_STALL", stall)
    layers, experts, per_rank = 60, 384, 5
    load = _zipf_load(layers, experts, 0)
    base = plan(load, 256, per_rank)
    calls = _counted(monkeypatch, "solve_shares")
    report = plan_with_report(
        load, 224, per_rank, previous=base, rank_mapping=RankMapping.resize(256, 224)
    )
    phy2log = report.placement.phy2log.numpy().reshape(layers, -1)
    for row in phy2log:
        assert set(range(experts)) <= set(row.tolist())
    monkeypatch.undo()
    return len(calls), float(report.placement.balancedness(load))


def test_scale_down_leaves_step_3_when_its_rounds_creep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step-3 rounds that raise a row by a sliver of the way left end at step 4 at once:
    fewer solves than rounds while the balancedness rises (5 against 7), and as balanced."""
    solves, balance = _scale_down(monkeypatch, repair_module.STEP3_STALL)
    creeping, creeping_balance = _scale_down(monkeypatch, 0.0)
    assert solves < creeping
    assert balance >= creeping_balance - 0.002


def test_scale_up_keeps_its_step_3_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows with joined ranks keep their step-3 rounds while they rise at all: the weights
    received for 8 layers x 384 experts on 256 -> 288 ranks x 2 slots are those of the rounds
    (going to step 4 at the first creeping round received 1440 where the rounds receive 1400)."""
    load = _zipf_load(8, 384, 0)
    base = plan(load, 256, 2)
    moved = []
    for stall in (repair_module.STEP3_STALL, 0.0):
        monkeypatch.setattr(repair_module, "STEP3_STALL", stall)
        report = plan_with_report(
            load, 288, 2, previous=base, rank_mapping=RankMapping.resize(256, 288)
        )
        moved.append(int(report.transfers.sum()))
    assert moved[0] == moved[1]


def test_rounds_without_a_swap_solve_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no swap helps (swap_towards a no-op), a drifted row is measured at steps 1 and 3
    only: a round (or step 4) whose swaps moved nothing solves no shares again."""
    monkeypatch.setattr(repair_module, "swap_towards", lambda *args, **kwargs: None)
    layers, experts, ranks, per_rank = 4, 32, 8, 5
    load = _zipf_load(layers, experts, 0)
    kept = plan(load, ranks, per_rank).phy2log.numpy().reshape(layers, ranks, per_rank)
    now = load * np.random.default_rng(1).lognormal(0.0, 0.3, load.shape)
    calls = _counted(monkeypatch, "solve_shares")
    target = np.ones(layers)  # out of reach: every row goes up the whole ladder
    budget = np.full(layers, ranks * per_rank)
    repair_module.repair(now, kept, target, budget, most=max_units(ranks * per_rank, experts))
    assert len(calls) == 2


def test_wide_pass_only_for_rows_short_with_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 4's second swap pass (more partners per heavy rank) takes only rows still short of
    their target with shares; rows whose equal split alone is short do not need it. With 60
    layers x 384 experts on 128 -> 144 ranks x 3 slots every row reaches its target with
    shares after the first pass (its equal split 0.06 short), so the second pass, a fifth of
    the plan's time, does not run (it did for all 60 rows before)."""
    layers, experts, ranks, per_rank = 60, 384, 144, 3
    most = max_units(ranks * per_rank, experts)
    wide: list[bool] = []
    inner = repair_module.swap_towards

    def checked(
        slots: np.ndarray,
        kept: np.ndarray,
        load: np.ndarray,
        target: np.ndarray,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("partners", repair_module.SWAP_PARTNERS) > repair_module.SWAP_PARTNERS:
            units = repair_module.solve_shares(slots, load, most)
            balance = balance_with_units(slots, load, units)[0]
            wide.append(bool((balance < target).all()))
        inner(slots, kept, load, target, *args, **kwargs)

    monkeypatch.setattr(repair_module, "swap_towards", checked)
    load = _zipf_load(layers, experts, 0)
    base = plan(load, 128, per_rank)
    plan_with_report(
        load, ranks, per_rank, previous=base, rank_mapping=RankMapping.resize(128, ranks)
    )
    assert wide == []  # every row reached its target with shares after the first pass
