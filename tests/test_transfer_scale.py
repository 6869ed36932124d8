"""plan_transfers at large shapes, cheaply: 512 ranks x 4 layers (pure, no processes).

The operations of every layer, found with numpy over all layers (``transfer_layers``), are
checked against a direct per-layer reference (the loops the plan used before, kept here as the
oracle), and the plan's invariants (minimal, valid, every changed slot written once, steps that
read before they write under any chunk cut) are checked at 512 ranks, where a plan has thousands
of operations and a cost that grew with ranks x ranks would show as a timeout, not an assert.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.eplb import EMPTY, LocalCopy, NodeLayout, Reload, Transfer, plan_transfers
from elastic_ep.eplb.placement import Placement
from elastic_ep.eplb.transfer_layers import layer_ops
from elastic_ep.eplb.transfer_ops import Op
from elastic_ep.rank_mapping import RankMapping
from tests.test_transfer_plan import KINDS, Scenario, _simulate, make_scenario, written_slots


def _reference_ops(
    previous: Placement,
    new: Placement,
    mapping: RankMapping,
    dead: tuple[int, ...],
    nodes: NodeLayout | None,
) -> list[list[Op]]:
    """The plan's operations, one layer and one new rank at a time, as documented in
    ``transfer_plan``: reloads, local copies, then transfers with senders chosen greedily."""
    layers = new.num_layers
    old_all = previous.phy2log.view(layers, previous.num_ranks, -1).tolist()
    new_all = new.phy2log.view(layers, new.num_ranks, -1).tolist()
    total_sent = [0] * previous.num_ranks
    result = []
    for layer in range(layers):
        old_slots, new_slots = old_all[layer], new_all[layer]
        written: defaultdict[int, set[int]] = defaultdict(set)
        needs = []
        for n, slots in enumerate(new_slots):
            o = mapping.new_to_old[n]
            before = old_slots[o] if o is not None else []
            want: dict[int, list[int]] = {}
            for i, e in enumerate(slots):
                if e != EMPTY and (i >= len(before) or before[i] != e):
                    want.setdefault(e, []).append(i)
                    if o is not None:
                        written[o].add(i)
            needs += [(n, e, tuple(want[e])) for e in sorted(want)]
        holders: dict[int, list[int]] = {}
        for o in range(previous.num_ranks):
            if o not in dead:
                for e in sorted(set(old_slots[o]) - {EMPTY}):
                    holders.setdefault(e, []).append(o)

        reloads: list[Op] = []
        local = []
        remote = []
        for n, e, dst in needs:
            o = mapping.new_to_old[n]
            if o is not None and e in old_slots[o]:
                local.append((n, e, dst, o))
            elif e in holders:
                remote.append((n, e, dst))
            else:
                reloads.append(Reload(layer, e, n, dst))
        copied: defaultdict[int, set[int]] = defaultdict(set)
        for n, _, dst, _ in local:
            copied[n].update(dst)
        ops = reloads + [
            LocalCopy(layer, e, n, src, dst, src in copied[n])
            for n, e, dst, o in local
            for src in [_pick(old_slots[o], e, written[o])]
        ]
        layer_sent = [0] * previous.num_ranks
        remote.sort(key=lambda need: (len(holders[need[1]]), need[1], need[0]))
        for n, e, dst in remote:
            keys = []
            for c in holders[e]:
                off = nodes is not None and nodes.old_rank_nodes[c] != nodes.new_rank_nodes[n]
                held = [i for i, x in enumerate(old_slots[c]) if x == e]
                over = all(i in written[c] for i in held)
                keys.append((int(off), layer_sent[c], int(over), total_sent[c], c))
            src = min(keys)[-1]
            layer_sent[src] += 1
            total_sent[src] += 1
            ops.append(Transfer(layer, e, src, _pick(old_slots[src], e, written[src]), n, dst))
        result.append(ops)
    return result


def _pick(slots: list[int], expert: int, written: set[int]) -> int:
    """Source slot: the lowest holding ``expert`` that the layer leaves intact, else the lowest."""
    held = [i for i, x in enumerate(slots) if x == expert]
    return ([i for i in held if i not in written] or held)[0]


def _nodes(sc: Scenario, per_node: int) -> NodeLayout:
    """Nodes of ``per_node`` consecutive old ranks; a survivor keeps its node, a joiner gets the
    node its new rank falls in."""
    new_nodes = []
    for n in range(sc.new.num_ranks):
        o = sc.mapping.old_rank(n)
        new_nodes.append((o if o is not None else n) // per_node)
    old_nodes = tuple(o // per_node for o in range(sc.previous.num_ranks))
    return NodeLayout(old_nodes, tuple(new_nodes))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.integers(0, 2**31),
    st.integers(2, 9),
    st.integers(1, 3),
    st.integers(2, 20),
    st.booleans(),
)
def test_layer_ops_match_the_per_layer_reference(
    kind: str, seed: int, ranks: int, layers: int, experts: int, with_nodes: bool
) -> None:
    sc = make_scenario(kind, seed, ranks, layers, experts)
    nodes = _nodes(sc, 2) if with_nodes else None
    got = layer_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)
    assert got == _reference_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)


@settings(max_examples=5, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**31), st.booleans())
def test_layer_ops_match_the_reference_at_512_ranks(kind: str, seed: int, with_nodes: bool) -> None:
    sc = make_scenario(kind, seed, 512, layers=4, experts=256)
    nodes = _nodes(sc, 8) if with_nodes else None
    got = layer_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)
    assert got == _reference_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)


@settings(max_examples=10, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.integers(0, 2**31),
    st.sampled_from([64, 256]),
    st.lists(st.integers(0, 10**6), max_size=8),
)
def test_plan_invariants_at_512_ranks(kind: str, seed: int, experts: int, cuts: list[int]) -> None:
    sc = make_scenario(kind, seed, 512, layers=4, experts=experts)
    plan = plan_transfers(sc.previous, sc.new, sc.mapping, dead_ranks=sc.dead)
    old = sc.previous.phy2log.view(4, sc.previous.num_ranks, -1).numpy()
    new = sc.new.phy2log.view(4, sc.new.num_ranks, -1).numpy()
    # Transfers: from a live holder's slot, to a rank that did not hold the expert, once each.
    table = plan.op_table
    sends = table.transfer
    assert not np.isin(table.src[sends], sc.dead).any()
    expert = np.array(
        [op.expert for step in plan.steps for op in step.ops if not isinstance(op, Reload)],
        dtype=np.int64,
    )
    layer, src, slot = table.layer[sends], table.src[sends], table.src_slot[sends]
    assert (old[layer, src, slot] == expert[sends]).all()
    for t in plan.transfers:
        o = sc.mapping.old_rank(t.dst)
        assert o is None or t.expert not in old[t.layer, o]
    received = {(t.layer, t.dst, t.expert) for t in plan.transfers}
    assert len(received) == len(plan.transfers)
    minimum = int(sc.new.transfers_from(sc.previous, sc.mapping).sum())
    assert len(plan.transfers) + len(plan.reloads) == minimum
    # Every changed slot written exactly once, with its new expert; nothing else written.
    written = written_slots(plan)
    changed = 0
    for layer, n, i in zip(*np.nonzero(new != EMPTY), strict=True):
        o = sc.mapping.old_rank(int(n))
        before = old[layer, o, i] if o is not None and i < old.shape[2] else None
        if before != new[layer, n, i]:
            changed += 1
            assert written[(int(layer), int(n), int(i))] == new[layer, n, i]
    assert changed == len(written)
    # Run on labels with random chunk cuts: every slot ends with its expert.
    mem = _simulate(sc, plan, [c % (len(plan.steps) + 1) for c in cuts])
    for layer, n, i in zip(*np.nonzero(new != EMPTY), strict=True):
        o = sc.mapping.old_rank(int(n))
        p = o if o is not None else sc.mapping.old_world_size + int(n)
        assert mem[(int(layer), p, int(i))] == new[layer, n, i]


def test_reference_and_plan_agree_on_a_scale_down_with_nodes() -> None:
    """A fixed case with every op kind: a dead rank's experts reloaded, local copies, nodes."""
    rng = random.Random(1)
    sc = make_scenario("dead", rng.randrange(2**31), 16, layers=3, experts=40)
    nodes = _nodes(sc, 4)
    got = layer_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)
    assert got == _reference_ops(sc.previous, sc.new, sc.mapping, sc.dead, nodes)
    kinds = {type(op) for ops in got for op in ops}
    assert {Transfer, LocalCopy} <= kinds
