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
    same slot.

    Every changed slot has one writer and every op reads one slot, so each op has at most one
    edge: the graph's components are its cycles and single ops, and a cycle's members point only
    inside it. Steps are numbered by their lowest op."""
    process = _processes(mapping)
    writer: dict[tuple[int, int], int] = {}
    for index, op in enumerate(ops):
        receiver = process[op.dst if isinstance(op, Transfer) else op.rank]
        for slot in op.dst_slots:
            writer[(receiver, slot)] = index
    after = [-1] * len(ops)  # after[r]: the op that writes what op r reads, or -1
    for index, op in enumerate(ops):
        if isinstance(op, Transfer):
            after[index] = writer.get((op.src, op.src_slot), -1)
        elif isinstance(op, LocalCopy):
            after[index] = writer.get((process[op.rank], op.src_slot), -1)
    cycle_head = _cycles(after)  # per op in a cycle, the cycle's lowest op; else -1
    step_of = [0] * len(ops)
    steps: list[Step] = []
    members: dict[int, list[Op]] = {}
    for index, op in enumerate(ops):
        head = cycle_head[index]
        if head < 0:
            step_of[index] = len(steps)
            steps.append(_single_step(layer, op))
        elif head == index:
            step_of[index] = len(steps)
            steps.append(Step(layer, (), (), ()))  # filled in below, once all members are known
            members[index] = [op]
        else:
            step_of[index] = step_of[head]
            members[head].append(op)
    for head, cycle in members.items():
        step_ops = tuple(cycle)
        steps[step_of[head]] = Step(
            layer, step_ops, _buffer_experts(step_ops), _sent_experts(step_ops)
        )
    successors: list[list[int]] = [[] for _ in steps]
    for index, w in enumerate(after):
        if w >= 0 and cycle_head[index] < 0:  # a cycle's edges stay inside it
            successors[step_of[index]].append(step_of[w])
    return LayerSteps(steps, successors)


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
    resources = _Resources(mapping)
    uses = [[resources.use(step.ops) for step in layer.steps] for layer in layers]
    order = interleave_steps(uses, [layer.successors for layer in layers])
    return tuple(layers[layer].steps[i] for layer, i in order)


class _Resources:
    """Resource ids: ``[0, old)`` an old rank's sends, ``processes + p`` process ``p``'s
    receives, ``(2 + sender) * processes + p`` a pair, above all pairs a process's local
    copies."""

    def __init__(self, mapping: RankMapping) -> None:
        self.process = _processes(mapping)
        self.processes = mapping.old_world_size + mapping.new_world_size
        self.local_copies = (2 + mapping.old_world_size) * self.processes

    def use(self, ops: tuple[Op, ...]) -> tuple[tuple[int, int], ...]:
        """What a step of ``ops`` moves, resources ascending."""
        processes, process = self.processes, self.process
        if len(ops) == 1:  # most steps: no dict (sends < receives < pairs < local copies)
            op = ops[0]
            if isinstance(op, Transfer):
                receiver = process[op.dst]
                pair = (2 + op.src) * processes + receiver
                return ((op.src, 1), (processes + receiver, 1), (pair, 1))
            if isinstance(op, LocalCopy):
                return ((self.local_copies + process[op.rank], len(op.dst_slots) + op.staged),)
            return ()
        use: dict[int, int] = {}
        for op in ops:
            if isinstance(op, Transfer):
                receiver = process[op.dst]
                pair = (2 + op.src) * processes + receiver
                for resource in (op.src, processes + receiver, pair):
                    use[resource] = use.get(resource, 0) + 1
            elif isinstance(op, LocalCopy):
                resource = self.local_copies + process[op.rank]
                use[resource] = use.get(resource, 0) + len(op.dst_slots) + op.staged
        return tuple(sorted(use.items()))


def _processes(mapping: RankMapping) -> list[int]:
    """Per new rank, one id for its process: its old rank if it had one, else
    ``old_world_size + new_rank``."""
    old = mapping.old_world_size
    return [n + old if o is None else o for n, o in enumerate(mapping.new_to_old)]


def _single_step(layer: int, op: Op) -> Step:
    """The step of one op alone (most steps)."""
    if isinstance(op, Transfer):
        return Step(layer, (op,), ((op.dst, 1),), ((op.src, 1),))
    if isinstance(op, LocalCopy) and op.staged:
        return Step(layer, (op,), ((op.rank, 1),), ())
    return Step(layer, (op,), (), ())


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


def _cycles(after: list[int]) -> list[int]:
    """Per node of a graph with at most one edge out of each (``after[v]``, -1 for none), the
    lowest node of its cycle, or -1 if it is on none."""
    head = [-1] * len(after)
    state = [0] * len(after)  # 0: not seen, 1: on the walk being followed, 2: done
    for start in range(len(after)):
        if state[start]:
            continue
        walk = []
        v = start
        while v >= 0 and not state[v]:
            state[v] = 1
            walk.append(v)
            v = after[v]
        if v >= 0 and state[v] == 1:  # the walk closed a cycle at v
            cycle = walk[walk.index(v) :]
            lowest = min(cycle)
            for u in cycle:
                head[u] = lowest
        for u in walk:
            state[u] = 2
    return head
