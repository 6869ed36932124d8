"""The order of a transfer plan's steps across layers: every rank's traffic at an even pace.

The executor cuts the plan's step sequence into chunks that fit its buffer, and a chunk lasts
as long as its busiest rank (and its busiest pair of ranks: NCCL splits a rank's channels among
its peers). Chunks of whole layers load one rank more in one chunk and another in the next: on
a 4-rank full reshuffle (26 layers) their busiest ranks summed to 10% more bytes than the
busiest rank's total. Interleaved as here, any run of steps carries about its share of every
rank's sends, receives and pairs (busiest ranks 2% over that total on that plan, busiest pairs
20% lower than with whole layers).

The greedy: a ready step (its predecessors placed) that uses nothing first; otherwise one whose
resources are furthest behind their pace. Ready steps are bucketed by what they use (their
*kind*), and a kind's score at overall progress ``p`` (items placed over all items) is

    score(k, p) = done(k) - pace(k) * p,

``done(k)`` the mean over its items of their resources' items placed, ``pace(k)`` the same mean
of the resources' totals. The least score wins, ties to the lowest kind (the kind of the lowest
``(layer, step)`` first), within a kind the lowest ``(layer, step)``.

Making a pick cheap. Kinds of equal ``pace`` keep their order as ``p`` grows, so they share one
heap keyed by ``done``; a pick compares only the heads of the heaps (one per distinct pace: 7 to
110 at 1024 ranks, against up to 55,000 kinds). ``done`` only grows, so a heap entry is a lower
bound: a pick revalidates the winning head from its resources' counters and, if it has gone
stale, pushes it back down and looks again (lazy updates). A pick then touches its own
resources, the heads, and the stale entries it meets, not every kind that shares a resource:
a kind's entry goes stale as its resources advance, up to the items per resource (layers x
slots a rank changes) times before it is picked, so a plan costs up to its uses x those items,
not steps x kinds (5 to 8 stale entries met per pick at 1024 ranks x 58 layers). Where
one resource has most of a kind's company (a joining rank's receives), its kinds of one pace
share a sub-heap keyed without it, whose head stands in the pace's heap: that resource's
advance then stales one entry, not all its kinds.

Up to ``DENSE_KINDS`` kinds (any plan of up to ~64 ranks; drifts and scale events up to ~1024
ranks at 58 layers), a pick instead weighs every kind at once in floats (numpy, each kind's
``done`` updated after each pick), as the order always did: cheaper there, and the same order. The heap queue's keys are exact integers (``done`` scaled by the
lcm of the sizes that share a pace); heads compare in floats, and heads within rounding of the
least are settled by integer cross-products, so its order is the greedy's exactly, ties
included; the floats' order differs from it only where two scores round alike. Either way every
rank computes the same order.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Sequence

import numpy as np

DENSE_KINDS = 8192
"""Up to this many kinds, a pick weighs every kind (numpy) instead of the heaps' heads."""

Use = tuple[tuple[int, int], ...]
"""What one step moves: ``(resource, items)`` pairs, resources ascending (e.g. a process's sends
or its receives); empty for a step that uses none."""


def interleave_steps(
    uses: Sequence[Sequence[Use]], successors: Sequence[Sequence[Sequence[int]]]
) -> list[tuple[int, int]]:
    """One sequence of every layer's steps, each after its predecessors, every resource
    advancing at the pace of its total.

    Args:
        uses: ``uses[layer][step]``: what the step moves.
        successors: ``successors[layer][step]``: steps of the same layer that may come only after
            it (a graph without cycles).
    Returns:
        ``(layer, step)`` of every step, in order.

    Greedy over the steps whose predecessors are placed: a step that moves nothing first;
    otherwise one whose resources are furthest behind, by the mean over its items of items
    done minus items due at the overall progress (see the module docstring).
    """
    kinds: dict[Use, int] = {}
    kind_of = [[kinds.setdefault(use, len(kinds)) for use in layer] for layer in uses]
    ids: dict[int, int] = {}  # resource -> dense id, in order of first use
    items = [tuple((ids.setdefault(r, len(ids)), n) for r, n in use) for use in kinds]
    total = [0] * len(ids)
    for row in kind_of:
        for kind in row:
            for r, n in items[kind]:
                total[r] += n
    free = kinds.get(())
    queue: _DenseQueue | _HeapQueue
    if len(kinds) <= DENSE_KINDS:
        queue = _DenseQueue(items, total)
    else:
        queue = _HeapQueue(items, total, _Paces(items, total))
    ready: list[list[tuple[int, int]]] = [[] for _ in kinds]  # heaps of (layer, step)

    def make_ready(layer: int, step: int) -> None:
        kind = kind_of[layer][step]
        if not ready[kind] and kind != free:
            queue.push(kind)
        heapq.heappush(ready[kind], (layer, step))

    waiting = [[0] * len(layer) for layer in uses]
    for layer, after in enumerate(successors):
        for later in after:
            for j in later:
                waiting[layer][j] += 1
        for step, count in enumerate(waiting[layer]):
            if count == 0:
                make_ready(layer, step)

    order: list[tuple[int, int]] = []
    for _ in range(sum(len(layer) for layer in uses)):
        kind = free if free is not None and ready[free] else queue.best()
        layer, step = heapq.heappop(ready[kind])
        if kind != free:
            queue.advance(kind, still_ready=bool(ready[kind]))
        order.append((layer, step))
        for j in successors[layer][step]:
            waiting[layer][j] -= 1
            if waiting[layer][j] == 0:
                make_ready(layer, j)
    return order


class _Paces:
    """Each kind's pace and the integer scale of its ``done``.

    Attributes:
        group: per kind, its pace's index (-1 for the kind that uses nothing).
        paces: per pace, ``pace(k) = sum(n * total[r]) / size`` as a reduced ``(num, den)``.
        lcm: per pace, the lcm of its kinds' sizes.
        pace: float64 ``[paces]``, each pace as a float.
        weights: per kind, per item of its use, ``n * lcm / size``: ``done(k) * lcm`` is
            ``sum(weight * done[r])``, an integer.
    """

    def __init__(self, items: Sequence[tuple[tuple[int, int], ...]], total: list[int]) -> None:
        group_of_pace: dict[tuple[int, int], int] = {}
        self.group = [-1] * len(items)
        size_of = [0] * len(items)
        sizes: list[set[int]] = []
        for k, use in enumerate(items):
            size = due = 0
            for r, n in use:
                size += n
                due += n * total[r]
            if size:
                gcd = math.gcd(due, size)
                g = group_of_pace.setdefault((due // gcd, size // gcd), len(group_of_pace))
                if g == len(sizes):
                    sizes.append(set())
                sizes[g].add(size)
                self.group[k], size_of[k] = g, size
        self.paces = list(group_of_pace)
        self.lcm = [math.lcm(*s) for s in sizes]
        self.weights = [
            tuple(n * (self.lcm[g] // size) for _, n in use) if size else ()
            for g, size, use in zip(self.group, size_of, items, strict=True)
        ]
        self.pace = np.array([num / den for num, den in self.paces])

    def least(self, heads: list[tuple[int, int, int]], moved: int, everything: int) -> int:
        """Of ``(key, pace, kind)`` heads, the index of the least score, exactly (integers: the
        score is ``(key * den * everything - num * moved * lcm) / (lcm * den * everything)``),
        ties to the lowest kind."""
        best, best_num, best_den, best_kind = -1, 0, 1, 0
        for i, (key, g, kind) in enumerate(heads):
            num, den = self.paces[g]
            lcm = self.lcm[g]
            score_num = key * den * everything - num * moved * lcm
            score_den = lcm * den * everything
            order = score_num * best_den - best_num * score_den
            if best < 0 or order < 0 or (order == 0 and kind < best_kind):
                best, best_num, best_den, best_kind = i, score_num, score_den, kind
        return best


class _DenseQueue:
    """Few kinds: every kind's ``done`` kept up to date after each pick (numpy, over the kinds
    that share a resource with the pick), the least score found by one pass over the kinds, in
    floats (exact ties go to the lowest kind; near-ties to rounding, as the order always did)."""

    def __init__(self, items: Sequence[tuple[tuple[int, int], ...]], total: list[int]) -> None:
        self.items = items
        self.moved = 0
        self.everything = max(sum(total), 1)
        users: list[list[tuple[int, float]]] = [[] for _ in total]  # per resource: (kind, share)
        due = np.zeros(len(items))  # per kind, pace(k)
        for k, use in enumerate(items):
            size = sum(n for _, n in use)
            for r, n in use:
                users[r].append((k, n / size))
            due[k] = sum(n * total[r] for r, n in use) / max(size, 1)
        self.due = due
        self.user_kind = [np.array([k for k, _ in u], dtype=np.int64) for u in users]
        self.user_share = [np.array([w for _, w in u]) for u in users]
        self.done = np.zeros(len(items))  # per kind, done(k)
        self.closed = np.full(len(items), np.inf)  # 0 where the kind has a ready step

    def push(self, kind: int) -> None:
        """``kind`` has a ready step again."""
        self.closed[kind] = 0.0

    def best(self) -> int:
        """The kind with the least score."""
        p = self.moved / self.everything
        return int((self.done - self.due * p + self.closed).argmin())

    def advance(self, kind: int, still_ready: bool) -> None:
        """One step of ``kind`` (the last :meth:`best`) is placed."""
        for r, n in self.items[kind]:
            self.done[self.user_kind[r]] += self.user_share[r] * n
            self.moved += n
        if not still_ready:
            self.closed[kind] = np.inf


class _HeapQueue:
    """Kinds with a ready step, in heaps by pace (and hub), and the items placed per resource.

    Per kind ``k`` of ``size`` items: ``pace(k) = sum(n * total[r]) / size`` (one heap per
    distinct value) and ``done(k) = sum(n * done[r]) / size``, as the integer
    ``sum(n * done[r]) * lcm / size`` (``lcm``: of the sizes that share the pace). A kind whose
    hub (its resource with the most kinds, twice as many as any other of its resources) advances
    goes stale with all the hub's kinds: those of one pace and hub share a heap, their key
    without the hub's part, and the pace's heap holds that heap's head (with the hub's part).
    """

    def __init__(
        self, items: Sequence[tuple[tuple[int, int], ...]], total: list[int], paces: _Paces
    ) -> None:
        self.items, self.paces = items, paces
        self.done = [0] * len(total)
        self.moved = 0
        self.everything = max(sum(total), 1)
        kinds_of = [0] * len(total)
        for use in items:
            for r, _ in use:
                kinds_of[r] += 1
        # Per kind: the resources of its key and their weights (the hub's left out), and its
        # sub-heap (-1: none); per sub-heap, its hub and the hub's weight.
        self.resources: list[tuple[int, ...]] = []
        self.weights: list[tuple[int, ...]] = []
        self.sub = [-1] * len(items)
        sub_of: dict[tuple[int, int, int], int] = {}
        self.sub_hub: list[int] = []
        self.sub_weight: list[int] = []
        for k, use in enumerate(items):
            hub = _hub(use, kinds_of)
            if hub < 0:
                self.resources.append(tuple(r for r, _ in use))
                self.weights.append(paces.weights[k])
                continue
            at = next(i for i, (r, _) in enumerate(use) if r == hub)
            weights = paces.weights[k]
            self.resources.append(tuple(r for r, _ in use[:at] + use[at + 1 :]))
            self.weights.append(weights[:at] + weights[at + 1 :])
            s = sub_of.setdefault((paces.group[k], hub, weights[at]), len(sub_of))
            if s == len(self.sub_hub):
                self.sub_hub.append(hub)
                self.sub_weight.append(weights[at])
            self.sub[k] = s
        self.sub_heaps: list[list[tuple[int, int]]] = [[] for _ in self.sub_hub]
        self.heaps: list[list[tuple[int, int, int]]] = [[] for _ in paces.paces]
        self.lcm = paces.lcm
        self.pace = paces.pace.tolist()
        self.head = np.full(len(paces.paces), np.inf)  # head's done(k) as a float; inf: empty
        # Heads' float scores err by a few ulps of the largest totals: within this, compare
        # exactly.
        self.tolerance = 1e-12 * (1 + max(total, default=0))

    def key(self, kind: int) -> int:
        """``done(kind)`` without its hub's part, scaled to an integer."""
        done = self.done.__getitem__
        return sum(map(operator.mul, map(done, self.resources[kind]), self.weights[kind]))

    def push(self, kind: int) -> None:
        """``kind`` has a ready step again."""
        g, s = self.paces.group[kind], self.sub[kind]
        entry = (self.key(kind), kind)
        if s >= 0:
            heapq.heappush(self.sub_heaps[s], entry)
            if self.sub_heaps[s][0] != entry:
                return  # the sub-heap's entry in its pace's heap is still a lower bound
            entry = (entry[0] + self.done[self.sub_hub[s]] * self.sub_weight[s], kind)
        heap = self.heaps[g]
        heapq.heappush(heap, (*entry, s))
        self.head[g] = heap[0][0] / self.lcm[g]

    def best(self) -> int:
        """The kind with the least score (it stays at the head of its heaps)."""
        p = self.moved / self.everything
        key, heaps, replace, tolerance = self.key, self.heaps, heapq.heapreplace, self.tolerance
        while True:
            scores = self.head - self.paces.pace * p
            g = int(scores.argmin())
            least = float(scores[g])
            scores[g] = np.inf
            runner_up = float(scores.min())  # the next pace's head
            if runner_up <= least + tolerance:  # within rounding: settle exactly
                near = [g, *np.flatnonzero(scores <= least + tolerance).tolist()]
                heads = [(heaps[i][0][0], i, heaps[i][0][1]) for i in near]
                g = near[self.paces.least(heads, self.moved, self.everything)]
                runner_up = -np.inf  # a stale head sends us back to the full comparison
            heap, lcm, pace = heaps[g], self.lcm[g], self.pace[g]
            fresh = True
            while heap:  # revalidate the head: keys only grow, so a stale one goes down
                stored, kind, s = heap[0]
                if s < 0:
                    now = key(kind)
                    if now == stored:
                        if fresh or stored / lcm - pace * p + tolerance < runner_up:
                            return kind
                        break
                    replace(heap, (now, kind, s))
                else:
                    entry = self._sub_head(s)
                    if entry == (stored, kind):
                        if fresh or stored / lcm - pace * p + tolerance < runner_up:
                            return kind
                        break
                    if entry is None:
                        heapq.heappop(heap)
                    else:
                        replace(heap, (*entry, s))
                fresh = False
            self.head[g] = heap[0][0] / lcm if heap else np.inf

    def advance(self, kind: int, still_ready: bool) -> None:
        """One step of ``kind`` (the last :meth:`best`) is placed; out of its heaps without
        another ready step."""
        done = self.done
        for r, n in self.items[kind]:
            done[r] += n
            self.moved += n
        if not still_ready:
            s = self.sub[kind]
            if s >= 0:
                heapq.heappop(self.sub_heaps[s])  # the pace's heap entry lapses lazily
                return
            g = self.paces.group[kind]
            heap = self.heaps[g]
            heapq.heappop(heap)
            self.head[g] = heap[0][0] / self.lcm[g] if heap else np.inf

    def _sub_head(self, s: int) -> tuple[int, int] | None:
        """Sub-heap ``s``'s head now, as its pace heap's entry ``(key, kind)``; None if empty."""
        sub, key = self.sub_heaps[s], self.key
        while sub:
            stored, kind = sub[0]
            now = key(kind)
            if now == stored:
                return now + self.done[self.sub_hub[s]] * self.sub_weight[s], kind
            heapq.heapreplace(sub, (now, kind))
        return None


def _hub(use: tuple[tuple[int, int], ...], kinds_of: list[int]) -> int:
    """The resource of ``use`` with the most kinds if it has at least twice as many as each
    other one; -1 if none."""
    hub, most, second = -1, 0, 0
    for r, _ in use:
        count = kinds_of[r]
        if count > most:
            hub, most, second = r, count, most
        elif count > second:
            second = count
    return hub if most >= 2 * second else -1
