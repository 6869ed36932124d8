"""Movement-aware repair, step one: place the replicas the new replica counts ask for.

Works on the layout of :mod:`elastic_ep.eplb.packing` (``slots`` int64 [B, R, S], -1 = empty),
batched over rows (layers). ``kept`` is the previous placement already mapped onto the new ranks
(slots of removed ranks gone, joined ranks empty). A weight "received" is an expert on a rank
that did not hold it in ``kept``; that is the only cost counted.

:func:`fill_missing` places every replica the new replica counts ask for and no rank holds where
it leaves the lowest rank load, in an empty slot or, once none is left, over a surplus replica
(an expert with more replicas than it now needs). Experts with no replica left come first and
are always placed; the others only while the transfer budget lasts. Replicas go a chunk at a
time, the j-th heaviest of a chunk to the j-th best target: an empty slot of every rank with
room, lightest first, then a surplus replica of every other rank, lightest after evicting it,
then (where those are fewer than the chunk's items and one rank has room) that rank's further
empty slots. One that cannot take its target waits for the next pass, and when a pass places
nothing the rest go one at a time. Empty slots the wanted replicas do not reach get an extra
replica of the heaviest expert per replica the rank lacks, while the budget lasts.

:mod:`elastic_ep.eplb.repair` runs it, then the swaps of :mod:`elastic_ep.eplb.repair_swaps`.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.repair_swaps import ORDER_BITS_FROM, any_slot, slot_sum
from elastic_ep.eplb.replication import ascending_order, descending_order

FILL_CHUNK_DIVISOR = 4
"""Replicas placed at once per row: a quarter of the ranks, or the empty slots of a row's only
rank with room if more (a joined rank's S slots in one chunk: 26 x 64 experts on 8 -> 9 x 9
slots, a scale-up, placed its 9 replicas in 10 chunks and 4 single placements, 2.2 -> 1.9 ms a
plan)."""


def drop_duplicates(kept: np.ndarray) -> np.ndarray:
    """int64 [B, R, S]: ``kept`` with second copies of an expert on one rank emptied (-1)."""
    order = np.argsort(kept, axis=2, kind="stable")
    ordered = np.take_along_axis(kept, order, axis=2)
    repeat = np.zeros(kept.shape, dtype=bool)
    repeat[:, :, 1:] = (ordered[:, :, 1:] == ordered[:, :, :-1]) & (ordered[:, :, 1:] >= 0)
    out = kept.copy()
    np.put_along_axis(out, order, np.where(repeat, -1, ordered), axis=2)
    return out


def fill_missing(
    slots: np.ndarray, load: np.ndarray, counts: np.ndarray, budget: np.ndarray
) -> None:
    """Place the missing replicas in ``slots`` (in place), see the module docstring.

    Args:
        slots: int64 [B, R, S], C-contiguous (updated through flat views), no expert twice on
            one rank.
        load: float64 [B, E].
        counts: int64 [B, E], the replica counts wanted (>= 1 each).
        budget: int64 [B], transfers allowed beyond the mandatory ones (experts with no replica).
    """
    num_experts = load.shape[1]
    have = expert_counts(slots, num_experts).copy()  # C-contiguous: updated through ravel()
    # Rows with no orphan and no budget place nothing (a drift's step one): rows are
    # independent, so the others alone give the same slots.
    active = np.flatnonzero((budget > 0) | (have == 0).any(1))
    if active.size < slots.shape[0]:
        if active.size:
            part = slots[active]
            fill_missing(part, load[active], counts[active], budget[active])
            slots[active] = part
        return
    per_replica = load / counts
    need = np.maximum(counts - have, 0)
    # Order: one replica of every expert that has none, then the rest; heaviest replica first.
    by_weight = descending_order(per_replica)  # one integer sort (a float argsort: 13x longer)
    flat = by_weight + (np.arange(by_weight.shape[0]) * num_experts)[:, None]  # (row, expert)
    orphan = (have == 0).ravel()[flat]
    extra = need.ravel()[flat] - orphan
    left = budget + (have == 0).sum(1)
    items = _queue(by_weight, orphan, extra, left)
    slot_w = slot_loads(slots, per_replica)
    rank_load = slot_sum(slot_w)
    open_slots = (slots < 0).sum(2)
    state = (slots, slot_w, per_replica, counts, have, rank_load, open_slots)
    # A row whose empty slots are all on one rank fills them in one chunk (see _targets).
    alone = np.count_nonzero(open_slots, axis=1) == 1
    chunk = max(1, slots.shape[1] // FILL_CHUNK_DIVISOR, int(open_slots[alone].max(initial=0)))
    while items.size:
        missed = np.zeros(items.shape, dtype=bool)
        for start in range(0, items.shape[1], chunk):
            part = items[:, start : start + chunk]
            b = np.flatnonzero((part >= 0).any(1))
            if b.size:
                placed = _place_chunk(*state, b, part[b])
                left[b] -= placed.sum(1)
                missed[b, start : start + chunk] = ~placed & (part[b] >= 0)
        if missed.sum() == (items >= 0).sum():
            break  # no progress in chunks: the rest one at a time
        items = _compact(items, missed)
    for k in range(items.shape[1]):
        b = np.flatnonzero(items[:, k] >= 0)
        placed = _place_one(*state, b, items[b, k])
        left[placed] -= 1
    _fill_empty_slots(slots, load, have, left)


def _compact(items: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """int64 [B, W'] (-1 padded): the ``items`` [B, W] where ``keep`` (bool [B, W]), in order."""
    row, column = np.nonzero(keep)
    per_row = np.bincount(row, minlength=items.shape[0])
    position = np.arange(row.size) - (np.cumsum(per_row) - per_row)[row]
    out = np.full((items.shape[0], int(per_row.max(initial=0))), -1, dtype=np.int64)
    out[row, position] = items[row, column]
    return out


def _queue(
    by_weight: np.ndarray, orphan: np.ndarray, extra: np.ndarray, left: np.ndarray
) -> np.ndarray:
    """int64 [B, W] (-1 padded): per row, the experts ``by_weight`` [B, E] where ``orphan``
    (bool [B, E]), then each expert ``extra`` (int64 [B, E]) times, cut after ``left`` [B]."""
    rows = by_weight.shape[0]
    # Both runs of every row, rows one after another: [B, 2, E] copies of [B, 2, E] experts.
    copies = np.stack([orphan, extra], axis=1).ravel()
    queue = np.repeat(np.repeat(by_weight, 2, axis=0).ravel(), copies)
    length = copies.reshape(rows, -1).sum(1)
    row = np.repeat(np.arange(rows), length)
    column = np.arange(queue.size) - (np.cumsum(length) - length)[row]
    kept = column < left[row]
    width = int(np.minimum(length, np.maximum(left, 0)).max()) if rows else 0
    items = np.full((rows, width), -1, dtype=np.int64)
    items[row[kept], column[kept]] = queue[kept]
    return items


def _fill_empty_slots(
    slots: np.ndarray, load: np.ndarray, have: np.ndarray, left: np.ndarray
) -> None:
    """Put an extra replica of the expert with the highest load per replica that the rank lacks
    into each empty slot still left (its only rank-free replicas were wanted on the ranks that
    have room), while the budget lasts."""
    rows, ranks, per_rank = slots.shape
    for _ in range(ranks * per_rank):
        empty = (slots < 0).reshape(rows, -1)
        b = np.flatnonzero(empty.any(1) & (left > 0))
        if b.size == 0:
            return
        where = empty[b].argmax(1)
        rank, slot = where // per_rank, where % per_rank
        gain = load[b] / np.maximum(have[b], 1)
        held = slots[b, rank]  # [n, S]
        row = np.broadcast_to(np.arange(b.size)[:, None], held.shape)
        gain[row[held >= 0], held[held >= 0]] = -np.inf
        expert = gain.argmax(1)
        ok = np.isfinite(gain[np.arange(b.size), expert])
        left[b[~ok]] = 0  # nothing fits that rank: leave the slot empty
        b, rank, slot, expert = b[ok], rank[ok], slot[ok], expert[ok]
        slots[b, rank, slot] = expert
        have[b, expert] += 1
        left[b] -= 1


def _place_chunk(
    slots: np.ndarray,
    slot_w: np.ndarray,
    per_replica: np.ndarray,
    counts: np.ndarray,
    have: np.ndarray,
    rank_load: np.ndarray,
    open_slots: np.ndarray,
    b: np.ndarray,
    expert: np.ndarray,
) -> np.ndarray:
    """Place the replicas ``expert`` int64 [n, c] (heaviest first, -1 = none) of rows ``b``
    at once, the j-th on the j-th best target: an empty slot of every rank with room, lightest
    first, then ranks holding a surplus replica, lightest after evicting it, then (a row with
    one open rank) that rank's further empty slots. An item whose rank already holds its
    expert (or takes it from an earlier item of the chunk), or whose eviction would take an
    expert below its wanted count, is not placed; returns bool [n, c], placed. State arrays as
    in :func:`_place_one`."""
    n, width = expert.shape
    _, ranks, per_rank = slots.shape
    experts = have.shape[1]
    # Flat indices throughout: one index array per gather is several times cheaper than a
    # tuple of them on these small arrays.
    cur = slots[b]  # [n, R, S]
    weight = slot_w[b]
    loads = rank_load[b]
    surplus = (have[b] - counts[b]).ravel()  # [n * E]
    # Whether a slot's expert has a surplus, gathered as bytes from [n, E + 1] (column 0: an
    # empty slot, never).
    has_surplus = np.zeros((n, experts + 1), dtype=bool)
    np.greater(surplus.reshape(n, experts), 0, out=has_surplus[:, 1:])
    evictable = has_surplus.ravel()[cur + (np.arange(n) * (experts + 1) + 1)[:, None, None]]
    evict_slot = np.where(evictable, weight, -np.inf).argmax(2)  # [n, R]
    by_rank = np.arange(0, n * ranks * per_rank, per_rank).reshape(n, ranks)
    relief = weight.ravel()[by_rank + evict_slot]
    room = open_slots[b]
    is_open = room > 0
    usable = is_open | any_slot(evictable)
    # Ranks in order: open ones by load, then evictable ones by load after the eviction.
    order = rank_order(usable, is_open, np.where(is_open, loads, loads - relief))
    targets = _targets(order, room, usable, width)
    if targets is None:  # one target per rank: the ranks in order
        rank, valid, level = order[:, :width], None, None  # [n, c]
    else:
        rank, valid, level = targets
    at = rank + np.arange(0, n * ranks, ranks)[:, None]  # flat (row, rank) of each item
    there = cur.reshape(-1, per_rank)[at]  # [n, c, S]
    held = any_slot(there == expert[..., None])
    placed = (expert >= 0) & usable.ravel()[at] & ~held
    opened = is_open.ravel()[at]
    if level is None:
        slot = np.where(opened, (there < 0).argmax(2), evict_slot.ravel()[at])
    else:  # the level-th empty slot of an open rank; an item for a further slot is dropped
        # where an earlier item of the chunk takes its expert to that rank
        placed &= valid
        placed &= ~_repeated((at * experts + expert).ravel(), placed).reshape(n, width)
        nth_empty = np.cumsum(there < 0, axis=2) == (level + 1)[..., None]
        slot = np.where(opened, nth_empty.argmax(2), evict_slot.ravel()[at])
    item = np.arange(0, n * width * per_rank, per_rank).reshape(n, width)
    evicted = np.where(placed & ~opened, there.ravel()[item + slot], -1)
    # At most `surplus` evictions of one expert per row, heaviest items first (one item per
    # row, or one eviction, never exceeds it: an evictable expert has a surplus).
    i, j = np.nonzero(evicted >= 0)
    if width > 1 and i.size > 1:
        over = _over_surplus(i * experts + evicted[i, j], surplus)
        if over.any():
            placed[i[over], j[over]] = False
            evicted[i[over], j[over]] = -1
    k = placed.ravel().nonzero()[0]
    rb, x, gone = b[k // width], expert.ravel()[k], evicted.ravel()[k]
    rank_at = rb * ranks + rank.ravel()[k]  # flat (row, rank)
    slot_at = rank_at * per_rank + slot.ravel()[k]  # flat (row, rank, slot)
    weight_at = rb * experts + x  # flat (row, expert)
    np.subtract.at(have.ravel(), (rb * experts + gone)[gone >= 0], 1)
    np.add.at(have.ravel(), weight_at, 1)
    new_weight = per_replica.ravel()[weight_at]
    every_weight = slot_w.ravel()
    if level is None:  # one item per rank: no repeated index
        open_slots.ravel()[rank_at[gone < 0]] -= 1
        rank_load.ravel()[rank_at] += new_weight - every_weight[slot_at]
    else:
        np.subtract.at(open_slots.ravel(), rank_at[gone < 0], 1)
        np.add.at(rank_load.ravel(), rank_at, new_weight - every_weight[slot_at])
    every_weight[slot_at] = new_weight
    slots.ravel()[slot_at] = x
    return placed


def _targets(
    order: np.ndarray, room: np.ndarray, usable: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The first ``width`` targets of each row where a row with one open rank (``room`` int64
    [n, R], empty slots) has fewer than ``width`` usable ranks (``usable`` bool [n, R]), or
    ``width`` exceeds R (another row's open rank set the chunk), else ``None`` (one target per
    rank: ``order`` int64 [n, R], open ranks first). Targets: the usable ranks in order (an
    empty slot of each open rank, an eviction of each other), then the only open rank's
    further empty slots; int64 [n, c] rank, bool [n, c] valid (False past a row's targets) and
    int64 [n, c] empty slot of its rank (0 for the first). Further slots
    of several open ranks in one chunk would be placed by the loads before it: 60 x 384
    experts on 128 -> 144 x 3 slots, a scale-up, then ended 0.0191 under vLLM's balancedness
    instead of 0.0080."""
    ranks = order.shape[1]
    one_open = np.count_nonzero(room, axis=1) == 1
    count = usable.sum(1)
    if width == 1 or (width <= ranks and not (one_open & (count < width)).any()):
        return None
    # The one open rank comes first in order; its first empty slot is among the usable ranks.
    extra = np.where(one_open, room.take(order[:, 0] + np.arange(0, room.size, ranks)) - 1, 0)
    column = np.arange(width)
    first = column < count[:, None]
    further = ~first & (column < (count + extra)[:, None])
    rank = np.where(further, order[:, :1], order[:, np.minimum(column, ranks - 1)])
    nth = np.where(further, column - count[:, None] + 1, 0)
    return rank, first | further, nth


def _repeated(key: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """bool [K]: candidates (``candidate`` bool, flat [K]) whose ``key`` int64 [K] an earlier
    candidate has."""
    index = np.flatnonzero(candidate.ravel())
    out = np.zeros(key.size, dtype=bool)
    if index.size < 2:
        return out
    by_key = index[np.argsort(key[index], kind="stable")]
    out[by_key[1:]] = key[by_key[1:]] == key[by_key[:-1]]
    return out


def _over_surplus(key: np.ndarray, surplus: np.ndarray) -> np.ndarray:
    """bool [K]: the evictions past their expert's surplus, for evictions of flat (row, expert)
    ``key`` int64 [K] (heaviest item first) and ``surplus`` int64 [n * E]: the k-th eviction
    of an expert in a row (from 0) where k >= its surplus."""
    by_key = key.argsort(kind="stable")
    sorted_key = key[by_key]
    first = np.empty(key.size, dtype=bool)
    first[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=first[1:])
    if first.all():  # no expert evicted twice in a row: an evictable expert has a surplus
        return np.zeros(key.size, dtype=bool)
    # Position of each eviction in its run of equal keys: index less the run's first index.
    position = np.arange(key.size)
    nth = np.empty_like(position)
    nth[by_key] = position - np.maximum.accumulate(np.where(first, position, 0))
    return nth >= surplus[key]


def rank_order(usable: np.ndarray, is_open: np.ndarray, value: np.ndarray) -> np.ndarray:
    """int64 [n, R]: each row's ranks, usable ones first, among them open ones first, then by
    ``value`` (float64 [n, R], finite, >= 0 but for float rounding: a value below zero counts
    as zero), ties in rank order: ``np.lexsort((value, ~is_open, ~usable), axis=1)``.

    Below ``ORDER_BITS_FROM`` ranks one stable sort of complex keys (numpy orders them by real,
    then imaginary part), a third of the lexsort's cost; from there one integer sort
    (:func:`ascending_order` with the classes), 13x faster again at 448 ranks (values equal but
    for their last 2 + log2(R) bits count as ties).
    """
    value = np.where(value > 0.0, value, 0.0)  # also -0.0 to +0.0: its sign bit is set
    classes = 2 * ~usable + ~is_open
    if value.shape[1] >= ORDER_BITS_FROM:
        return ascending_order(value, classes)
    key = np.empty(value.shape, dtype=np.complex128)
    key.real = classes
    key.imag = value
    return key.argsort(axis=1, kind="stable")


def _place_one(
    slots: np.ndarray,
    slot_w: np.ndarray,
    per_replica: np.ndarray,
    counts: np.ndarray,
    have: np.ndarray,
    rank_load: np.ndarray,
    open_slots: np.ndarray,
    b: np.ndarray,
    expert: np.ndarray,
) -> np.ndarray:
    """Put one replica of ``expert[i]`` into row ``b[i]`` where it leaves the lightest rank;
    returns the rows where it found room. Updates every state array in place (``slot_w``
    [B, R, S] and ``rank_load`` [B, R] hold loads at the wanted replica counts, ``open_slots``
    int64 [B, R] counts the empty slots of each rank)."""
    lacks = ~any_slot(slots[b] == expert[:, None, None])  # [n, R]
    # Fill empty slots before evicting (an empty slot left at the end is capacity lost): the
    # lightest rank lacking the expert that has one, at its first empty slot.
    open_rank = (open_slots[b] > 0) & lacks
    rank = np.where(open_rank, rank_load[b], np.inf).argmin(1)
    slot = (slots[b, rank] < 0).argmax(1)
    ok = open_rank.any(1)
    full = np.flatnonzero(~ok)
    if full.size:  # no empty slot the expert may take: evict a surplus replica
        rank[full], slot[full], ok[full] = _best_eviction(
            slots[b[full]],
            slot_w[b[full]],
            rank_load[b[full]],
            lacks[full],
            have[b[full]] > counts[b[full]],
            per_replica[b[full], expert[full]],
        )
    b, expert, rank, slot = b[ok], expert[ok], rank[ok], slot[ok]
    evicted = slots[b, rank, slot]
    gone = evicted >= 0
    open_slots[b[~gone], rank[~gone]] -= 1
    have[b[gone], evicted[gone]] -= 1
    rank_load[b, rank] += per_replica[b, expert] - slot_w[b, rank, slot]
    slot_w[b, rank, slot] = per_replica[b, expert]
    slots[b, rank, slot] = expert
    have[b, expert] += 1
    return b


def _best_eviction(
    current: np.ndarray,
    slot_w: np.ndarray,
    rank_load: np.ndarray,
    lacks: np.ndarray,
    surplus: np.ndarray,
    weight: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rank, slot, found) [n]: the slot whose surplus replica (or emptiness) to replace so
    that the rank lacking the expert is left lightest, for slots ``current`` int64 [n, R, S]
    with loads ``slot_w`` float64 [n, R, S], ``rank_load`` float64 [n, R], ``lacks`` bool
    [n, R], ``surplus`` bool [n, E] (experts above their wanted count), ``weight`` float64 [n]
    (the placed replica's load)."""
    n, _, per_rank = current.shape
    padded = np.ones((n, surplus.shape[1] + 1), dtype=bool)  # column 0: an empty slot
    padded[:, 1:] = surplus
    replaceable = padded.ravel()[current + (np.arange(n) * padded.shape[1] + 1)[:, None, None]]
    after = rank_load[:, :, None] - slot_w + weight[:, None, None]
    score = np.where(replaceable & lacks[:, :, None], after, np.inf).reshape(n, -1)
    best = score.argmin(1)
    found = np.isfinite(score[np.arange(n), best])
    return best // per_rank, best % per_rank, found
