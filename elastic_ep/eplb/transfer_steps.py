"""A transfer plan's steps: each layer's operations grouped by in-place hazards, then all layers
in one order.

In-place hazards: a slot may be read (as a send or local-copy source) and overwritten in the same
layer. :func:`layer_steps` draws an edge from each operation to the one that writes the slot it
reads ("read no later than that write"), keyed by (process, slot) since an old rank and its new
rank are one process with one set of slots. A step is a strongly connected component of that
graph (Tarjan's algorithm, iterative): an operation alone, or a cycle that must move together
(e.g. two ranks swapping an expert). The graph between components has no cycle, so the layer's
steps come out with ``successors``: the steps that may run only after each.

Each step carries what the executor's chunk cuts read: ``buffer_experts`` (per receiving new
rank, one expert per transfer it receives and per staged local copy) and ``sent_experts`` (per
sending old rank, one per transfer).

:func:`interleave_layers` then merges all layers' steps, each after its predecessors, with
:func:`~elastic_ep.eplb.step_order.interleave_steps`, on what each step moves: per transfer one
send on the sender, one receive on the receiver and one item on that (sender, receiver) pair;
per local copy one item per slot it writes (and one more if staged) on its rank's copies. The
executor may cut the resulting sequence into chunks anywhere between steps.

Pure and deterministic, like the plan it builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from elastic_ep.eplb.step_order import interleave_steps
from elastic_ep.eplb.transfer_ops import LocalCopy, Op, Step, Transfer
from elastic_ep.rank_mapping import RankMapping

__all__ = ["LayerSteps", "interleave_layers", "layer_steps"]


@dataclass(frozen=True)
class LayerSteps:
    """One layer's steps, in no particular order, and which must precede which.

    Attributes:
        steps: the layer's steps.
        successors: ``successors[i]``: steps that may run only after step ``i`` (their writes
            overwrite a slot step ``i`` reads).
    """

    steps: list[Step]
    successors: list[list[int]]


def layer_steps(layer: int, ops: list[Op], mapping: RankMapping) -> LayerSteps:
    """Group ``ops`` into steps (strongly connected components of "must read before that
    write"), with the order between steps that keeps every read no later than the write to the
    same slot."""
    writer: dict[tuple[int, int], int] = {}
    for index, op in enumerate(ops):
        receiver = op.dst if isinstance(op, Transfer) else op.rank
        for slot in op.dst_slots:
            writer[(_process(mapping, receiver), slot)] = index
    before: list[list[int]] = [[] for _ in ops]  # before[r] = ops that must not precede op r
    for index, op in enumerate(ops):
        if isinstance(op, Transfer):
            read = (op.src, op.src_slot)
        elif isinstance(op, LocalCopy):
            read = (_process(mapping, op.rank), op.src_slot)
        else:
            continue
        w = writer.get(read)
        if w is not None:
            before[index].append(w)
    components = [sorted(members) for members in _strongly_connected(before)]
    components.sort()
    comp_of = [0] * len(ops)
    for c, members in enumerate(components):
        for m in members:
            comp_of[m] = c
    successors: list[set[int]] = [set() for _ in components]
    for r, ws in enumerate(before):
        for w in ws:
            if comp_of[r] != comp_of[w]:
                successors[comp_of[r]].add(comp_of[w])
    steps = []
    for members in components:
        step_ops = tuple(ops[m] for m in members)
        steps.append(Step(layer, step_ops, _buffer_experts(step_ops), _sent_experts(step_ops)))
    return LayerSteps(steps, [sorted(s) for s in successors])


def interleave_layers(layers: Sequence[LayerSteps], mapping: RankMapping) -> tuple[Step, ...]:
    """All layers' steps in one sequence, ordered by :func:`interleave_steps` on what each
    moves: per transfer one send on the sender, one receive on the receiver and one item on that
    (sender, receiver) pair; per local copy one item per slot it writes (and one more if staged)
    on its rank's copies. Counted per process (an old rank and its new rank are one process).

    Pairs count because NCCL splits a rank's channels among the peers of a batch: on 4x H200 a
    chunk whose sends went mostly to one peer ran at ~140 GB/s for that pair while the rank had
    ~300 GB/s. Local copies count so that they spread over the chunks, where they overlap
    transfers: as steps that use no resource they came first, and on a 2-rank full reshuffle
    the first two chunks (1.1 GB of staging) held nothing but local copies."""
    processes = mapping.old_world_size + mapping.new_world_size
    local_copies = (2 + mapping.old_world_size) * processes  # above every pair's resource
    uses = []
    for layer in layers:
        row = []
        for step in layer.steps:
            use: dict[int, int] = {}
            for op in step.ops:
                if isinstance(op, Transfer):
                    receiver = _process(mapping, op.dst)
                    pair = (2 + op.src) * processes + receiver
                    for resource in (op.src, processes + receiver, pair):
                        use[resource] = use.get(resource, 0) + 1
                elif isinstance(op, LocalCopy):
                    resource = local_copies + _process(mapping, op.rank)
                    use[resource] = use.get(resource, 0) + len(op.dst_slots) + op.staged
            row.append(tuple(sorted(use.items())))
        uses.append(row)
    order = interleave_steps(uses, [layer.successors for layer in layers])
    return tuple(layers[layer].steps[i] for layer, i in order)


def _process(mapping: RankMapping, new_rank: int) -> int:
    """One id per process, whether it has an old rank or not: its old rank if it had one, else
    ``old_world_size + new_rank``."""
    old = mapping.new_to_old[new_rank]
    return old if old is not None else mapping.old_world_size + new_rank


def _buffer_experts(ops: tuple[Op, ...]) -> tuple[tuple[int, int], ...]:
    need: dict[int, int] = {}
    for op in ops:
        if isinstance(op, Transfer):
            need[op.dst] = need.get(op.dst, 0) + 1
        elif isinstance(op, LocalCopy) and op.staged:
            need[op.rank] = need.get(op.rank, 0) + 1
    return tuple(sorted(need.items()))


def _sent_experts(ops: tuple[Op, ...]) -> tuple[tuple[int, int], ...]:
    sent: dict[int, int] = {}
    for op in ops:
        if isinstance(op, Transfer):
            sent[op.src] = sent.get(op.src, 0) + 1
    return tuple(sorted(sent.items()))


def _strongly_connected(edges: list[list[int]]) -> list[list[int]]:
    """Tarjan's algorithm, iterative: the strongly connected components of a directed graph."""
    index = [-1] * len(edges)
    low = [0] * len(edges)
    on_stack = [False] * len(edges)
    stack: list[int] = []
    components: list[list[int]] = []
    counter = 0
    for root in range(len(edges)):
        if index[root] != -1:
            continue
        work = [(root, 0)]
        while work:
            v, child = work.pop()
            if child == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            if child < len(edges[v]):
                work.append((v, child + 1))
                w = edges[v][child]
                if index[w] == -1:
                    work.append((w, 0))
                elif on_stack[w]:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                members = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    members.append(w)
                    if w == v:
                        break
                components.append(members)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return components
