"""interleave_steps: the greedy's order exactly (an oracle in exact fractions) by the heap
queue, and the same order by the dense one but where floats round near-ties; every step once
and after its predecessors, deterministic; large plans cheaply."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import step_order
from elastic_ep.eplb.step_order import Use, interleave_steps

Plan = tuple[list[list[Use]], list[list[list[int]]]]


def _oracle(uses: Sequence[Sequence[Use]], successors: Sequence[Sequence[Sequence[int]]]):
    """The greedy as its definition reads, every ready step scored in exact fractions: a step
    using nothing first; else the least ``done - pace * progress``, ties to the kind (distinct
    use) seen first, then the lowest ``(layer, step)``."""
    kinds: dict[Use, int] = {}
    for layer in uses:
        for use in layer:
            kinds.setdefault(use, len(kinds))
    total: Counter[int] = Counter()
    for layer in uses:
        for use in layer:
            for r, n in use:
                total[r] += n
    everything = max(sum(total.values()), 1)
    done: Counter[int] = Counter()
    moved = 0
    waiting = [[0] * len(layer) for layer in uses]
    for layer, after in enumerate(successors):
        for later in after:
            for j in later:
                waiting[layer][j] += 1
    ready = {(lay, i) for lay in range(len(uses)) for i in range(len(uses[lay]))}
    ready = {s for s in ready if waiting[s[0]][s[1]] == 0}

    def score(s: tuple[int, int]) -> tuple[Fraction, int, tuple[int, int]]:
        use = uses[s[0]][s[1]]
        size = sum(n for _, n in use)
        mean_done = Fraction(sum(n * done[r] for r, n in use), size)
        pace = Fraction(sum(n * total[r] for r, n in use), size)
        return mean_done - pace * Fraction(moved, everything), kinds[use], s

    order = []
    while ready:
        free = [s for s in ready if not uses[s[0]][s[1]]]
        pick = min(free) if free else min(ready, key=score)
        for r, n in uses[pick[0]][pick[1]]:
            done[r] += n
            moved += n
        ready.remove(pick)
        order.append(pick)
        for j in successors[pick[0]][pick[1]]:
            waiting[pick[0]][j] -= 1
            if waiting[pick[0]][j] == 0:
                ready.add((pick[0], j))
    return order


@st.composite
def plans(draw: st.DrawFn, resources: int = 6) -> Plan:
    """Up to 5 layers of up to 12 steps, each using up to 3 of ``resources`` (or none), and
    successors later in the layer."""
    uses, successors = [], []
    for _ in range(draw(st.integers(0, 5))):
        n = draw(st.integers(0, 12))
        use = st.dictionaries(st.integers(0, resources - 1), st.integers(1, 3), max_size=3)
        uses.append([tuple(sorted(draw(use).items())) for _ in range(n)])
        successors.append(
            [
                sorted(draw(st.sets(st.integers(i + 1, n - 1), max_size=3))) if i + 1 < n else []
                for i in range(n)
            ]
        )
    return uses, successors


def _both_queues(plan: Plan) -> list[list[tuple[int, int]]]:
    """The order with every kind weighed per pick, and with the heaps of the heads."""
    out = []
    for dense in (10**9, 0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(step_order, "DENSE_KINDS", dense)
            out.append(interleave_steps(*plan))
    return out


def _check_order(plan: Plan, order: list[tuple[int, int]]) -> None:
    uses, successors = plan
    assert sorted(order) == [(lay, i) for lay in range(len(uses)) for i in range(len(uses[lay]))]
    at = {step: position for position, step in enumerate(order)}
    for layer, after in enumerate(successors):
        for i, later in enumerate(after):
            assert all(at[(layer, i)] < at[(layer, j)] for j in later)


@settings(max_examples=300, deadline=None)
@given(st.one_of(plans(), plans(resources=2), plans(resources=40)))
def test_heap_queue_gives_the_greedys_exact_order(plan: Plan) -> None:
    dense, heaps = _both_queues(plan)
    assert heaps == _oracle(*plan)
    _check_order(plan, dense)
    assert interleave_steps(*plan) == dense  # deterministic (few kinds: the dense queue)
    assert _both_queues(plan) == [dense, heaps]


def _reshuffle_uses(rng: random.Random, ranks: int, layers: int) -> Plan:
    """What a full reshuffle of one slot per rank moves: per layer, every rank receives one
    expert from a random other rank (send, receive and pair resources, as the transfer plan
    numbers them), a few steps after another."""
    uses, successors = [], []
    for _ in range(layers):
        row = []
        for dst in range(ranks):
            src = (dst + rng.randrange(1, ranks)) % ranks
            pair = (2 + src) * 2 * ranks + dst
            row.append(((src, 1), (2 * ranks + dst, 1), (pair, 1)))
        uses.append(row)
        successors.append([[i + 1] if i % 7 == 0 and i + 1 < ranks else [] for i in range(ranks)])
    return uses, successors


def test_large_plan_keeps_order_and_pace_by_either_queue() -> None:
    """512 ranks x 4 layers (2,048 steps, ~2,000 kinds), by either queue: every step once, after
    its predecessors, and every rank's sends and receives within two items of their share at
    every prefix; layer after layer strays further."""
    plan = _reshuffle_uses(random.Random(0), 512, 4)
    for order in _both_queues(plan):
        _check_order(plan, order)
        assert _worst_lag(plan[0], order, 512) <= 2.0
    layer_order = [(layer, i) for layer in range(4) for i in range(512)]
    assert _worst_lag(plan[0], layer_order, 512) > 3.0


def _worst_lag(uses: list[list[Use]], order: list[tuple[int, int]], ranks: int) -> float:
    """The most any rank's sends or receives stray from their share over the prefixes of
    ``order``: ``|done - total * progress|`` in items."""
    processes = list(range(ranks)) + [2 * ranks + r for r in range(ranks)]
    total: Counter[int] = Counter(r for layer in uses for use in layer for r, _ in use)
    everything = sum(n for layer in uses for use in layer for _, n in use)
    done: Counter[int] = Counter()
    moved, worst = 0, 0.0
    for layer, i in order:
        for r, n in uses[layer][i]:
            done[r] += n
            moved += n
        worst = max(worst, max(abs(done[r] - total[r] * moved / everything) for r in processes))
    return worst


def test_every_rank_keeps_its_pace() -> None:
    """On a 128-rank reshuffle of 8 layers, every prefix of the order has moved each rank's
    sends and receives within two items of its share; layer after layer strays further."""
    uses, successors = _reshuffle_uses(random.Random(1), 128, 8)
    order = interleave_steps(uses, successors)
    layer_order = [(layer, i) for layer in range(8) for i in range(128)]
    assert _worst_lag(uses, order, 128) <= 2.0
    assert _worst_lag(uses, layer_order, 128) > 3.0
