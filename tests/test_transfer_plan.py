"""plan_transfers: properties of the plan (pure, no processes) over random scale events."""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import (
    EMPTY,
    LocalCopy,
    NodeLayout,
    Placement,
    Reload,
    Step,
    Transfer,
    TransferPlan,
    exec_chunks,
    plan_transfers,
)
from elastic_ep.eplb.exec_chunks import RAMP, cut_chunks, step_costs
from elastic_ep.eplb.exec_ranks import GroupRanks
from elastic_ep.eplb.step_order import interleave_steps
from elastic_ep.rank_mapping import RankMapping

T = TypeVar("T")


def random_placement(
    rng: random.Random, layers: int, experts: int, ranks: int, slots: int, empty: float = 0.15
) -> Placement:
    """Every expert at least once per layer; other slots random experts or empty."""
    rows = []
    for _ in range(layers):
        row = list(range(experts)) + [
            EMPTY if rng.random() < empty else rng.randrange(experts)
            for _ in range(ranks * slots - experts)
        ]
        rng.shuffle(row)
        rows.append(row)
    return Placement(torch.tensor(rows, dtype=torch.int64), experts, ranks)


def drifted(rng: random.Random, placement: Placement, fraction: float) -> Placement:
    """``placement`` with about ``fraction`` of its slots rewritten, every expert still placed."""
    rows = placement.phy2log.tolist()
    for row in rows:
        for i in range(len(row)):
            if rng.random() < fraction:
                row[i] = rng.randrange(placement.num_logical)
        first = {}
        for i, e in enumerate(row):
            first.setdefault(e, i)
        spare = [i for i, e in enumerate(row) if e == EMPTY or first[e] != i]
        missing = sorted(set(range(placement.num_logical)) - set(row))
        for e, i in zip(missing, spare, strict=False):
            row[i] = e
    return Placement(
        torch.tensor(rows, dtype=torch.int64), placement.num_logical, placement.num_ranks
    )


@dataclass(frozen=True)
class Scenario:
    """One scale event. ``group`` says which numbering the group that runs it uses."""

    name: str
    previous: Placement
    new: Placement
    mapping: RankMapping
    dead: tuple[int, ...]
    group: str  # "new" or "old"


def make_scenario(kind: str, seed: int, ranks: int, layers: int = 2, experts: int = 6) -> Scenario:
    """A random scenario of ``kind`` whose group has ``ranks`` processes."""
    rng = random.Random(seed)
    s_old = max(2, -(-experts // ranks) + rng.randrange(2))
    if kind in ("drift", "reshuffle"):
        prev = random_placement(rng, layers, experts, ranks, s_old)
        new = (
            drifted(rng, prev, 0.25)
            if kind == "drift"
            else random_placement(rng, layers, experts, ranks, s_old)
        )
        return Scenario(kind, prev, new, RankMapping.identity(ranks), (), "new")
    if kind == "scale_up":  # ranks-1 -> ranks; the joiner lands at a random new rank
        old_members = list(range(ranks - 1))
        new_members = [*old_members, ranks - 1]
        rng.shuffle(new_members)
        mapping = RankMapping.from_members(old_members, new_members)
        s_old = max(s_old, -(-experts // (ranks - 1)))
        prev = random_placement(rng, layers, experts, ranks - 1, s_old)
        new = random_placement(rng, layers, experts, ranks, max(2, -(-experts // ranks)), 0.0)
        return Scenario(kind, prev, new, mapping, (), "new")
    if kind == "scale_down":  # ranks -> ranks-1; a random rank leaves
        leaver = rng.randrange(ranks)
        mapping = RankMapping.without(ranks, [leaver])
        prev = random_placement(rng, layers, experts, ranks, s_old)
        new = random_placement(rng, layers, experts, ranks - 1, -(-experts // (ranks - 1)) + 1)
        return Scenario(kind, prev, new, mapping, (), "old")
    if kind == "dead":  # ranks+1 -> ranks; one died, the survivors' group runs it
        dead = rng.randrange(ranks + 1)
        mapping = RankMapping.without(ranks + 1, [dead])
        prev = random_placement(rng, layers, experts, ranks + 1, s_old, 0.0)
        new = random_placement(rng, layers, experts, ranks, -(-experts // ranks) + 1, 0.0)
        return Scenario(kind, prev, new, mapping, (dead,), "new")
    raise ValueError(kind)


KINDS = ("drift", "reshuffle", "scale_up", "scale_down", "dead")


@st.composite
def plans(draw: st.DrawFn) -> tuple[Scenario, TransferPlan]:
    kind = draw(st.sampled_from(KINDS))
    scenario = make_scenario(
        kind,
        draw(st.integers(0, 2**31)),
        ranks=draw(st.integers(2, 5)),
        layers=draw(st.integers(1, 3)),
        experts=draw(st.integers(2, 9)),
    )
    plan = plan_transfers(
        scenario.previous, scenario.new, scenario.mapping, dead_ranks=scenario.dead
    )
    return scenario, plan


def _old_local(p: Placement, layer: int, rank: int) -> list[int]:
    return p.local_slots(rank)[layer].tolist()


@settings(max_examples=300, deadline=None)
@given(plans())
def test_transfers_are_minimal_and_valid(case: tuple[Scenario, TransferPlan]) -> None:
    sc, plan = case
    # No duplicate sends of an expert to a rank, none to a rank that already had it.
    seen = set()
    for t in plan.transfers:
        key = (t.layer, t.dst, t.expert)
        assert key not in seen
        seen.add(key)
        old_self = sc.mapping.old_rank(t.dst)
        assert old_self is None or t.expert not in _old_local(sc.previous, t.layer, old_self)
        # The sender holds the expert in that slot and is alive.
        assert t.src not in sc.dead
        assert _old_local(sc.previous, t.layer, t.src)[t.src_slot] == t.expert
    # Network + reloads = exactly what the two placements imply.
    minimum = int(sc.new.transfers_from(sc.previous, sc.mapping).sum())
    assert len(plan.transfers) + len(plan.reloads) == minimum
    # Reloads are exactly the experts no live old rank holds.
    lost = sc.previous.lost_with(sc.dead) | (sc.previous.logcnt == 0)
    for r in plan.reloads:
        assert bool(lost[r.layer, r.expert])
    for c in plan.local_copies:
        old_self = sc.mapping.old_rank(c.rank)
        assert old_self is not None
        assert _old_local(sc.previous, c.layer, old_self)[c.src_slot] == c.expert


def written_slots(plan: TransferPlan) -> dict[tuple[int, int, int], int]:
    """(layer, new rank, slot) -> expert for every slot the plan writes; asserts none twice."""
    written: dict[tuple[int, int, int], int] = {}
    for step in plan.steps:
        for op in step.ops:
            rank = op.dst if isinstance(op, Transfer) else op.rank
            for slot in op.dst_slots:
                assert (op.layer, rank, slot) not in written
                written[(op.layer, rank, slot)] = op.expert
    return written


@settings(max_examples=300, deadline=None)
@given(plans())
def test_every_changed_slot_written_once(case: tuple[Scenario, TransferPlan]) -> None:
    sc, plan = case
    written = written_slots(plan)
    for layer in range(sc.new.num_layers):
        for n in range(sc.new.num_ranks):
            o = sc.mapping.old_rank(n)
            before = _old_local(sc.previous, layer, o) if o is not None else []
            for i, e in enumerate(_old_local(sc.new, layer, n)):
                changed = e != EMPTY and (i >= len(before) or before[i] != e)
                assert written.get((layer, n, i)) == (e if changed else None)


def _simulate(sc: Scenario, plan: TransferPlan, cuts: list[int]) -> dict[tuple[int, int, int], int]:
    """Run the plan on expert labels the way the executor does: the steps cut into chunks at
    ``cuts``; chunk k+1's sends and staging read before chunk k writes back (overlap); unstaged
    local copies read their sources at write-back, before the rest of their chunk is written."""
    old_w = sc.mapping.old_world_size

    def proc(new_rank: int) -> int:
        o = sc.mapping.old_rank(new_rank)
        return o if o is not None else old_w + new_rank

    mem: dict[tuple[int, int, int], int] = {}
    for layer in range(sc.previous.num_layers):
        for o in range(old_w):
            for i, e in enumerate(_old_local(sc.previous, layer, o)):
                mem[(layer, o, i)] = e
    bounds = [0, *sorted(set(cuts)), len(plan.steps)]
    chunks = [plan.steps[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    Write = tuple[tuple[int, int, int], "int | tuple[int, int, int]"]

    def stage(chunk: tuple) -> list[Write]:
        writes: list[Write] = []
        for step in chunk:
            for op in step.ops:
                source: int | tuple[int, int, int] = op.expert
                if isinstance(op, Transfer):
                    source = mem[(op.layer, op.src, op.src_slot)]
                elif isinstance(op, LocalCopy):
                    key = (op.layer, proc(op.rank), op.src_slot)
                    source = mem[key] if op.staged else key
                rank = op.dst if isinstance(op, Transfer) else op.rank
                writes.extend(((op.layer, proc(rank), s), source) for s in op.dst_slots)
        return writes

    def write_back(writes: list[Write]) -> None:
        # Unstaged copies run first, all at once: none may read what another one writes.
        lazy = [(key, source) for key, source in writes if not isinstance(source, int)]
        assert not {source for _, source in lazy} & {key for key, _ in lazy}
        values = [(key, mem[source]) for key, source in lazy]
        for key, source in writes:
            if isinstance(source, int):
                mem[key] = source
        mem.update(values)

    pending = None
    for chunk in chunks:
        staged = stage(chunk)
        if pending is not None:
            write_back(pending)
        pending = staged
    if pending is not None:
        write_back(pending)
    return mem


@settings(max_examples=300, deadline=None)
@given(plans(), st.lists(st.integers(0, 200), max_size=6))
def test_steps_order_reads_before_writes(
    case: tuple[Scenario, TransferPlan], cuts: list[int]
) -> None:
    sc, plan = case
    mem = _simulate(sc, plan, [c % (len(plan.steps) + 1) for c in cuts])
    for layer in range(sc.new.num_layers):
        for n in range(sc.new.num_ranks):
            o = sc.mapping.old_rank(n)
            p = o if o is not None else sc.mapping.old_world_size + n
            for i, e in enumerate(_old_local(sc.new, layer, n)):
                if e != EMPTY:
                    assert mem[(layer, p, i)] == e


@settings(max_examples=100, deadline=None)
@given(plans())
def test_deterministic_and_replan(case: tuple[Scenario, TransferPlan]) -> None:
    sc, plan = case
    again = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
    assert again.steps == plan.steps
    assert plan.replan(sc.dead).steps == plan.steps
    assert (
        sum(plan.sends_per_old_rank()) == sum(plan.receives_per_new_rank()) == len(plan.transfers)
    )


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_interleave_steps_is_a_precedence_respecting_permutation(data: st.DataObject) -> None:
    layers = data.draw(st.integers(0, 5))
    uses, successors = [], []
    for _ in range(layers):
        n = data.draw(st.integers(0, 12))
        use = st.dictionaries(st.integers(0, 5), st.integers(1, 3), max_size=3)
        uses.append([tuple(sorted(data.draw(use).items())) for _ in range(n)])
        successors.append(
            [
                sorted(data.draw(st.sets(st.integers(i + 1, n - 1), max_size=3)))
                if i + 1 < n
                else []
                for i in range(n)
            ]
        )
    order = interleave_steps(uses, successors)
    assert sorted(order) == [(layer, i) for layer in range(layers) for i in range(len(uses[layer]))]
    at = {step: position for position, step in enumerate(order)}
    for layer in range(layers):
        for i, later in enumerate(successors[layer]):
            assert all(at[(layer, i)] < at[(layer, j)] for j in later)
    assert order == interleave_steps(uses, successors)  # deterministic


def _busiest_per_window(steps: list[Step], ranks: int, window: int) -> int:
    """Windows of ``window`` consecutive transfers; the sum over windows of the most experts any
    rank sends or receives in one."""
    transfers = [op for step in steps for op in step.ops if isinstance(op, Transfer)]
    total = 0
    for at in range(0, len(transfers), window):
        load = np.zeros((2, ranks), dtype=np.int64)
        for t in transfers[at : at + window]:
            load[0, t.src] += 1
            load[1, t.dst] += 1
        total += int(load.max())
    return total


def test_steps_balance_ranks_within_windows() -> None:
    """Any run of steps loads every rank about equally: on a 4-rank full reshuffle of 26 layers,
    windows of ~2 layers' transfers have busiest ranks summing to within 3% of the busiest rank's
    total, where whole layers in order are 9% over."""
    rng = random.Random(0)
    previous = random_placement(rng, 26, 64, 4, 20, empty=0)
    new = random_placement(rng, 26, 64, 4, 20, empty=0)
    plan = plan_transfers(previous, new)
    busiest = max(*plan.sends_per_old_rank(), *plan.receives_per_new_rank())
    window = 2 * len(plan.transfers) // 26
    layer_order = sorted(plan.steps, key=lambda s: s.layer)  # stable: each layer's own order
    assert _busiest_per_window(list(plan.steps), 4, window) <= 1.03 * busiest
    assert _busiest_per_window(layer_order, 4, window) > 1.06 * busiest


def test_local_copies_spread_over_the_plan() -> None:
    """Local copies overlap transfers only where they share chunks with them: in every tenth of
    a 2-rank full reshuffle's steps both kinds appear at about their share (they used to all come
    first, so the first chunks staged local copies with nothing on the network)."""
    rng = random.Random(0)
    previous = random_placement(rng, 26, 64, 2, 40, empty=0)
    plan = plan_transfers(previous, random_placement(rng, 26, 64, 2, 40, empty=0))
    kinds = [
        [isinstance(op, Transfer) for op in step.ops if not isinstance(op, Reload)]
        for step in plan.steps
    ]
    transfers = sum(sum(k) for k in kinds)
    copies = sum(len(k) - sum(k) for k in kinds)
    assert transfers > 500 and copies > 100
    tenth = len(kinds) // 10
    for at in range(0, 10 * tenth, tenth):
        window = [t for k in kinds[at : at + tenth] for t in k]
        share = len(window) / (transfers + copies)
        assert 0.7 * share < sum(window) / transfers < 1.3 * share, at
        assert 0.7 * share < (len(window) - sum(window)) / copies < 1.3 * share, at


def test_step_buffer_counts_receives_and_staged_copies() -> None:
    prev = Placement(torch.tensor([[0, 1, 2, 3]]), 4, 2)
    swap_local = plan_transfers(prev, Placement(torch.tensor([[1, 0, 2, 3]]), 4, 2))
    assert [s.buffer_experts for s in swap_local.steps] == [((0, 2),)]  # a 2-cycle: one step
    assert all(isinstance(op, LocalCopy) and op.staged for op in swap_local.steps[0].ops)
    swap_remote = plan_transfers(prev, Placement(torch.tensor([[2, 1, 0, 3]]), 4, 2))
    assert [s.buffer_experts for s in swap_remote.steps] == [((0, 1), (1, 1))]
    # A copy whose source a receive overwrites runs first at write-back: no buffer either.
    shift = plan_transfers(prev, Placement(torch.tensor([[2, 0, 1, 3]]), 4, 2))
    (copy,) = shift.local_copies
    assert (copy.src_slot, copy.dst_slots, copy.staged) == (0, (1,), False)
    # A copy from a slot that stays put needs no buffer.
    keep = plan_transfers(prev, Placement(torch.tensor([[0, 0, 2, 3]]), 4, 2))
    (op,) = keep.local_copies
    assert (op.src_slot, op.dst_slots, op.staged) == (0, (1,), False)
    assert keep.steps[0].buffer_experts == ()


def test_senders_spread_evenly() -> None:
    # 3 old ranks each hold all 6 experts (2 slots x ... replicated); a joiner needs all 6.
    prev = Placement(torch.tensor([list(range(6)) * 3]), 6, 3)
    new = Placement(torch.tensor([list(range(6)) * 3 + list(range(6))]), 6, 4)
    plan = plan_transfers(prev, new, RankMapping.resize(3, 4))
    assert plan.sends_per_old_rank() == (2, 2, 2)
    assert plan.receives_per_new_rank() == (0, 0, 0, 6)


def test_same_node_sender_preferred() -> None:
    prev = Placement(torch.tensor([[0, 1, 0, 1]]), 2, 4)  # expert 0 on ranks 0 and 2
    new = Placement(torch.tensor([[1, 1, 0, 1, 0]]), 2, 5)
    mapping = RankMapping.resize(4, 5)
    far = NodeLayout((0, 0, 1, 1), (0, 0, 1, 1, 1))  # the joiner (new rank 4) is on node 1
    (t,) = [t for t in plan_transfers(prev, new, mapping, nodes=far).transfers if t.expert == 0]
    assert t.src == 2
    near = NodeLayout((1, 1, 0, 0), (1, 1, 0, 0, 1))
    (t,) = [t for t in plan_transfers(prev, new, mapping, nodes=near).transfers if t.expert == 0]
    assert t.src == 0


def test_dead_rank_experts_are_reloaded() -> None:
    prev = Placement(torch.tensor([[0, 1, 2, 2]]), 3, 2)
    new = Placement(torch.tensor([[0, 1]]), 3, 1)
    new_full = Placement(torch.tensor([[2, 1]]), 3, 1)
    mapping = RankMapping.without(2, [0])
    plan = plan_transfers(prev, new_full, mapping, dead_ranks=[0])
    assert plan.reloads == (Reload(0, 1, 0, (1,)),)
    assert plan.transfers == ()  # expert 2 is already on the survivor
    assert len(plan_transfers(prev, new, mapping, dead_ranks=[0]).reloads) == 2
    assert plan_transfers(prev, new, mapping).reloads == ()  # a leaver (not dead) sends


def test_bad_inputs() -> None:
    prev = Placement(torch.tensor([[0, 1, 2, 3]]), 4, 2)
    with pytest.raises(TypeError, match="previous must be a Placement"):
        plan_transfers(prev.phy2log, prev)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers x"):
        plan_transfers(prev, Placement(torch.tensor([[0, 1, 2, 3]] * 2), 4, 2))
    with pytest.raises(ValueError, match="rank_mapping maps 2 -> 2"):
        plan_transfers(prev, Placement(torch.tensor([[0, 1, 2, 3]]), 4, 1))
    with pytest.raises(
        ValueError, match="dead rank 1 must be an old rank that rank_mapping removes"
    ):
        plan_transfers(prev, prev, dead_ranks=[1])
    with pytest.raises(TypeError, match="dead_ranks must be ints"):
        plan_transfers(
            prev,
            Placement(torch.tensor([[0, 1, 2, 3]]), 4, 1),
            RankMapping.without(2, [1]),
            dead_ranks=["1"],  # type: ignore[list-item]
        )
    with pytest.raises(ValueError, match="node 0 before and node 1 after"):
        plan_transfers(prev, prev, nodes=NodeLayout((0, 0), (1, 0)))
    with pytest.raises(ValueError, match="nodes has 1 old"):
        plan_transfers(prev, prev, nodes=NodeLayout((0,), (0, 0)))


@settings(max_examples=60, deadline=None)
@given(
    plans(),
    st.lists(st.integers(1, 5), min_size=1, max_size=4),
    st.integers(0, 40),
    st.booleans(),
)
def test_step_experts_and_greedy_chunks(
    case: tuple[Scenario, TransferPlan], row_bytes: list[int], budget_rows: int, overlap: bool
) -> None:
    """The plan's sparse step counts match its steps; chunks cover the steps in order, each
    within its cap (or a single step), and each as long as the cap allows (greedy); their
    estimates are the sums of the dense cost matrix."""
    _, plan = case
    layer, received, sent = plan.step_experts
    assert layer.tolist() == [step.layer for step in plan.steps]
    assert [tuple(row) for row in received.tolist()] == [
        (i, r, n) for i, step in enumerate(plan.steps) for r, n in step.buffer_experts
    ]
    assert [tuple(row) for row in sent.tolist()] == [
        (i, r, n) for i, step in enumerate(plan.steps) for r, n in step.sent_experts
    ]
    rows = [256 * row_bytes[i % len(row_bytes)] for i in range(plan.new.num_layers)]
    ranks = GroupRanks.new_numbering(plan.rank_mapping)
    world = plan.rank_mapping.new_world_size
    budget = 256 * budget_rows
    cost = step_costs(plan, rows, ranks).dense(world)
    if cost.max(initial=0) > budget:
        with pytest.raises(ValueError, match="cannot hold the smallest movable unit"):
            cut_chunks(plan, rows, ranks, budget, overlap)
        return
    chunks = cut_chunks(plan, rows, ranks, budget, overlap)
    assert [s for c in chunks for s in c.steps] == list(plan.steps)
    cap = budget // 2 if overlap else budget
    small = cap // RAMP if overlap else cap  # the first chunk's cap, and the last one's
    starts = [0, *itertools.accumulate(len(c.steps) for c in chunks)]
    for i, chunk in enumerate(chunks):
        at, end = starts[i], starts[i + 1]
        used = cost[at:end].sum(axis=0)
        assert chunk.estimate == tuple((g, int(u)) for g, u in enumerate(used) if u)
        limit = small if i == 0 else cap
        assert end - at == 1 or used.max() <= limit
        tail_split = i == len(chunks) - 2 and overlap
        if end < len(plan.steps) and not tail_split:  # greedy: the next step would not fit
            assert (used + cost[end]).max() > limit
    if overlap and len(plan.steps) > 1 and len(chunks) > 1:
        last = cost[starts[-2] :]
        assert last.sum(axis=0).max() <= small or len(last) == 1  # small, or one big step
    assert starts == _dense_bounds(cost, budget, overlap)
    window, exec_chunks._Rows.WINDOW = exec_chunks._Rows.WINDOW, 1  # the windows' doubling
    try:
        assert cut_chunks(plan, rows, ranks, budget, overlap) == chunks
    finally:
        exec_chunks._Rows.WINDOW = window


def _dense_bounds(cost: np.ndarray, budget: int, overlap: bool) -> list[int]:
    """The chunk bounds from the dense cost matrix ``[steps, ranks]`` by running totals per rank
    (the cut as it was computed before the costs went sparse): the oracle of ``cut_chunks``."""
    cap = budget // 2 if overlap else budget
    total = np.zeros((len(cost) + 1, cost.shape[1]), dtype=np.int64)
    np.cumsum(cost, axis=0, out=total[1:])
    bounds = [0]
    while bounds[-1] < len(cost):
        start = bounds[-1]
        limit = cap // RAMP if overlap and start == 0 else cap
        end = min(
            int(np.searchsorted(total[:, g], total[start, g] + limit, side="right")) - 1
            for g in range(cost.shape[1])
        )
        bounds.append(max(end, start + 1))
    if overlap and len(cost) > 1:
        tail = max(
            int(np.searchsorted(total[:, g], total[-1, g] - cap // RAMP, side="left"))
            for g in range(cost.shape[1])
        )
        if bounds[-2] < min(tail, len(cost) - 1):
            bounds.insert(-1, min(tail, len(cost) - 1))
    return bounds


def _peak_bytes(fn: Callable[[], T]) -> tuple[int, T]:
    """Peak bytes traced (Python objects and numpy arrays) while ``fn`` runs, and its result."""
    tracemalloc.start()
    try:
        result = fn()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def test_host_work_grows_with_the_plan_not_with_ranks_squared() -> None:
    """At 1024 ranks (2 layers, one slot each, a 10% drift: ~200 ops) the plan's step counts,
    the step order and the chunk cut stay small: nothing is steps x ranks (a dense step matrix
    would be ~1.6 MB here) or ranks x ranks (the step order's pair resources once were 2M Python
    lists: 660 MB of peak for this plan)."""
    rng = random.Random(3)
    previous = random_placement(rng, 2, 256, 1024, 1, empty=0)
    new = drifted(rng, previous, 0.1)
    peak, plan = _peak_bytes(lambda: plan_transfers(previous, new))
    ops = len(plan.op_table.step)
    assert 100 < ops < 400
    assert peak < 8 << 20  # 2 MB measured; 660 MB with the dense matrices and pair lists
    _, received, sent = plan.step_experts
    assert len(received) <= ops and len(sent) <= ops
    ranks = GroupRanks.new_numbering(plan.rank_mapping)
    rows = [1 << 20] * 2
    peak, chunks = _peak_bytes(lambda: cut_chunks(plan, rows, ranks, 8 << 20, True))
    assert len(chunks) > 1
    assert peak < 1_000 * ops
