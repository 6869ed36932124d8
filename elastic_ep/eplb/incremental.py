"""Movement-aware repair: start from what the ranks already hold and change as little as needed.

Works on the layout of :mod:`elastic_ep.eplb.packing` (``slots`` int64 [B, R, S], -1 = empty),
batched over rows (layers). ``kept`` is the previous placement already mapped onto the new ranks
(slots of removed ranks gone, joined ranks empty). A weight "received" is an expert on a rank
that did not hold it in ``kept``; that is the only cost counted. :func:`repair` runs two steps:

1. :func:`fill_missing`: every replica the new replica counts ask for and no rank holds is placed
   where it leaves the lowest rank load, in an empty slot or, once none is left, over a surplus
   replica (an expert with more replicas than it now needs). Experts with no replica left come
   first and are always placed; the others only while the transfer budget lasts.
   Replicas go a chunk at a time (the j-th heaviest of a chunk to the j-th best rank); one
   that cannot take its rank waits for the next pass, and when a pass places nothing the rest
   go one at a time.
   With one slot per rank :func:`repair` uses :mod:`elastic_ep.eplb.single_slot` instead (no
   swap can help there).
2. :func:`swap_towards`: swaps between heavy and light ranks, best load gain per weight
   received first, until the row reaches its target balancedness, no swap helps, or the budget
   is spent. Each step improves up to ``SWAP_PAIRS`` heavy ranks per row, each with its own
   light partners. Swaps that undo an earlier transfer are free. Rows still short of their
   target get a second pass with more partners per heavy rank (R / 4, at most
   ``WIDE_PARTNERS``: a step's search grows with heavy ranks x partners).
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.expert_bits import expert_bits, has_expert, move_bit
from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.single_slot import repair_single_slot

SWAP_PARTNERS = 8  # light ranks tried as swap partners of one heavy rank
WIDE_PARTNERS = 64  # partners per heavy rank in the second pass (rows short of their target)
FILL_CHUNK_DIVISOR = 4  # replicas placed at once per row: a quarter of the ranks
SWAP_PAIRS = 16  # most heavy ranks of one row improved per step, each with its own partners
_FREE_SWAP_COST = 0.25  # denominator floor: a swap that costs nothing still needs a real gain


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
        slots: int64 [B, R, S], no expert twice on one rank.
        load: float64 [B, E].
        counts: int64 [B, E], the replica counts wanted.
        budget: int64 [B], transfers allowed beyond the mandatory ones (experts with no replica).
    """
    num_experts = load.shape[1]
    per_replica = load / counts
    have = _replica_counts_of(slots, num_experts)
    need = np.maximum(counts - have, 0)
    # Order: one replica of every expert that has none, then the rest; heaviest replica first.
    by_weight = np.argsort(-per_replica, axis=1, kind="stable")
    orphan = np.take_along_axis(have == 0, by_weight, axis=1)
    extra = np.take_along_axis(need, by_weight, axis=1) - orphan
    left = budget + (have == 0).sum(1)
    items = _queue(by_weight, orphan, extra, left)
    slot_w = slot_loads(slots, per_replica)
    rank_load = slot_w.sum(2)
    open_slots = (slots < 0).sum(2)
    state = (slots, slot_w, per_replica, counts, have, rank_load, open_slots)
    chunk = max(1, slots.shape[1] // FILL_CHUNK_DIVISOR)
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
    at once, the j-th on the j-th best rank: ranks with an empty slot first, lightest first,
    then ranks holding a surplus replica, lightest after evicting it. An item whose rank
    already holds its expert, or whose eviction would take an expert below its wanted count,
    is not placed; returns bool [n, c], placed. State arrays as in :func:`_place_one`."""
    n, width = expert.shape
    cur = slots[b]  # [n, R, S]
    weight = slot_w[b]
    loads = rank_load[b]
    surplus = have[b] - counts[b]  # [n, E]
    row = np.arange(n)[:, None, None]
    evictable = (cur >= 0) & (surplus[row, np.maximum(cur, 0)] > 0)
    evict_slot = np.where(evictable, weight, -np.inf).argmax(2)  # [n, R]
    relief = np.take_along_axis(weight, evict_slot[..., None], 2)[..., 0]
    is_open = open_slots[b] > 0
    usable = is_open | evictable.any(2)
    # Ranks in order: open ones by load, then evictable ones by load after the eviction.
    order = np.lexsort((np.where(is_open, loads, loads - relief), ~is_open, ~usable), axis=1)
    rank = order[:, :width]  # [n, c]
    rows = np.arange(n)[:, None]
    held = (cur[rows, rank] == expert[..., None]).any(2)
    placed = (expert >= 0) & usable[rows, rank] & ~held
    opened = is_open[rows, rank]
    slot = np.where(opened, (cur[rows, rank] < 0).argmax(2), evict_slot[rows, rank])
    evicted = np.where(placed & ~opened, cur[rows, rank, slot], -1)
    # At most `surplus` evictions of one expert per row, heaviest items first.
    i, j = np.nonzero(evicted >= 0)
    if i.size:
        key = i * per_replica.shape[1] + evicted[i, j]
        by_key = np.argsort(key, kind="stable")
        sorted_key = key[by_key]
        starts = np.flatnonzero(np.diff(sorted_key, prepend=-1))
        run = np.arange(key.size) - np.repeat(starts, np.diff(starts, append=key.size))
        nth = np.empty_like(run)
        nth[by_key] = run
        over = nth >= surplus[i, evicted[i, j]]
        placed[i[over], j[over]] = False
        evicted[i[over], j[over]] = -1
    i, j = np.nonzero(placed)
    rb, rr, rs, x = b[i], rank[i, j], slot[i, j], expert[i, j]
    gone = evicted[i, j]
    open_slots[rb[gone < 0], rr[gone < 0]] -= 1
    np.subtract.at(have, (rb[gone >= 0], gone[gone >= 0]), 1)
    np.add.at(have, (rb, x), 1)
    rank_load[rb, rr] += per_replica[rb, x] - slot_w[rb, rr, rs]
    slot_w[rb, rr, rs] = per_replica[rb, x]
    slots[rb, rr, rs] = x
    return placed


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
    lacks = ~(slots[b] == expert[:, None, None]).any(2)  # [n, R]
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


def swap_towards(
    slots: np.ndarray,
    kept: np.ndarray,
    load: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    max_steps: int,
    partners: int = SWAP_PARTNERS,
) -> None:
    """Improve ``slots`` in place by swaps, see the module docstring.

    Args:
        slots: int64 [B, R, S], no expert twice on one rank.
        kept: int64 [B, R, S], what the ranks held before (defines what costs a transfer).
        load: float64 [B, E].
        target: float64 [B], balancedness at which a row stops.
        budget: int64 [B], the most weights a row may receive in total.
        max_steps: most swaps per row.
        partners: light ranks tried with each heavy rank (at most R / 4).
    """
    rows, ranks, per_rank = slots.shape
    num_experts = load.shape[1]
    per_replica = load / np.maximum(_replica_counts_of(slots, num_experts), 1)
    # Flat layouts, one row per (row, rank), so that every gather is a single index.
    weight = slot_loads(slots, per_replica).reshape(-1, per_rank)
    flat_slots = slots.reshape(-1, per_rank)
    held = expert_bits(flat_slots, num_experts)
    held_before = expert_bits(kept.reshape(-1, per_rank), num_experts)
    spent = received_count(slots, kept)
    loads = weight.sum(1)
    if ranks < 2:
        return
    # Fewer partners per heavy rank on few ranks, so that several heavy ranks move per step.
    partners = min(partners, max(1, ranks // 4))
    pairs = max(1, min(SWAP_PAIRS, ranks // (partners + 1)))
    active = np.arange(rows)
    for _ in range(max_steps):
        rank_loads = loads[(active * ranks)[:, None] + np.arange(ranks)]
        peak = rank_loads.max(1)
        balance = rank_loads.mean(1) / np.maximum(peak, 1e-300)
        keep = (balance < target[active]) & (spent[active] < budget[active])
        active, rank_loads = active[keep], rank_loads[keep]
        if active.size == 0:
            return
        # The `pairs` heaviest ranks, each with its own `partners` of the lightest, disjoint:
        # the i-th heaviest gets the lightest ranks i, i + pairs, i + 2 * pairs, ...
        order = np.argsort(rank_loads, axis=1, kind="stable") + (active * ranks)[:, None]
        heavy = order[:, : -pairs - 1 : -1]  # [A, k]
        partner = order[:, : pairs * partners].reshape(-1, partners, pairs).transpose(0, 2, 1)
        # Heavy ranks after the first only while above the row's target peak.
        limit = rank_loads.mean(1) / target[active]
        wanted = loads[heavy] > limit[:, None]
        wanted[:, 0] = True
        row, which = np.nonzero(wanted)
        left = (budget[active] - spent[active]) // wanted.sum(1)
        found = _best_paid_swap(
            flat_slots,
            weight,
            loads,
            (held, held_before),
            heavy[row, which],
            partner[row, which],
            left[row],
        )
        improved, h_rank, h_slot, p_rank, p_slot, cost = (part[found[0]] for part in found)
        if not improved.any():
            return
        x, y = flat_slots[h_rank, h_slot], flat_slots[p_rank, p_slot]
        wx, wy = weight[h_rank, h_slot], weight[p_rank, p_slot]
        flat_slots[h_rank, h_slot], flat_slots[p_rank, p_slot] = y, x
        weight[h_rank, h_slot], weight[p_rank, p_slot] = wy, wx
        loads[h_rank] += wy - wx
        loads[p_rank] += wx - wy
        move_bit(held, h_rank, x, y)
        move_bit(held, p_rank, y, x)
        np.add.at(spent, active[row[found[0]]], cost)
        still = np.zeros(rows, dtype=bool)
        still[active[row[found[0]]]] = True
        active = np.flatnonzero(still)


def _best_paid_swap(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    bits: tuple[np.ndarray, np.ndarray],
    heavy: np.ndarray,
    partner: np.ndarray,
    left: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Best swap per heavy rank by load gain per transfer, with one of its partners; returns
    (improved, heavy rank, heavy slot, partner rank, partner slot, transfers it costs), each
    [A], ranks as flat ids.

    Args:
        slots, weight: int64 / float64 [B * R, S]; loads: float64 [B * R].
        bits: :func:`expert_bits` of what every rank holds now and held before.
        heavy: int64 [A], flat ids of the heavy ranks; partner: int64 [A, M], their partners
            (no rank in two of these).
        left: int64 [A], transfers each heavy rank's swap may spend.
    """
    rows = heavy.size
    r_idx = np.arange(rows)
    heavy_load = loads[heavy]
    hx = slots[heavy] + 1  # [A, S], expert ids shifted past the "empty" column
    px = slots[partner] + 1  # [A, M, S]
    per_rank, pairs = hx.shape[1], px.shape[1] * px.shape[2]
    # Candidate swaps as [A, S, M * S] (heavy slot, then partner and its slot): every
    # broadcast below runs along the long last axis.
    delta = weight[heavy][:, :, None] - weight[partner].reshape(rows, 1, pairs)
    # Gain = heavy load - max(heavy load - delta, partner load + delta), in place (big arrays).
    gap = np.repeat(heavy_load[:, None] - loads[partner], per_rank, axis=1)  # [A, M * S]
    gain = np.subtract(gap[:, None, :], delta)
    np.minimum(delta, gain, out=gain)
    # Transfers: x received by the partner (unless it held x before) minus the one it had cost
    # the heavy rank, and likewise for y going the other way; each side is -1, 0 or 1, or
    # "never" for a swap that would put an expert twice on one rank (or a rank with itself).
    held, held_before = bits
    heavy_x, part_x = hx - 1, px - 1  # [A, S], [A, M, S]
    # "Did not hold it before" per side, as 0/1 (an empty slot is never a transfer).
    new_on_partner = ~has_expert(held_before, partner[:, None, :], heavy_x[:, :, None])
    new_on_heavy = ~has_expert(held_before, heavy[:, None, None], part_x)  # [A, M, S]
    x_side = np.subtract(
        new_on_partner & (heavy_x >= 0)[:, :, None],
        ~has_expert(held_before, heavy[:, None], heavy_x)[:, :, None] & (heavy_x >= 0)[:, :, None],
        dtype=np.float64,
    )  # [A, S, M]
    y_side = np.subtract(
        new_on_heavy & (part_x >= 0),
        ~has_expert(held_before, partner[:, :, None], part_x) & (part_x >= 0),
        dtype=np.float64,
    )
    x_side[
        has_expert(held, partner[:, None, :], heavy_x[:, :, None])
        | (partner == heavy[:, None])[:, None, :]
    ] = np.inf
    y_side[has_expert(held, heavy[:, None, None], part_x)] = np.inf
    # Score = gain / max(cost, 1/4) (exact: the divisor is 1/4, 1 or 2), 0 where a side is
    # not allowed (+inf) or the swap is over budget. Every allowed swap costs at most 2, so only
    # rows with less left need a budget mask.
    cost = np.repeat(x_side, per_rank, axis=2)  # [A, S, M * S]
    cost += y_side.reshape(rows, 1, pairs)
    tight = np.flatnonzero(left < 2)
    over = cost[tight] > left[tight, None, None] if tight.size else None
    np.maximum(cost, _FREE_SWAP_COST, out=cost)
    score = np.divide(gain, cost, out=cost).reshape(rows, -1)
    if over is not None:
        score[tight] = np.where(over.reshape(tight.size, -1), 0.0, score[tight])
    best = score.argmax(1)
    chosen = gain.reshape(rows, -1)[r_idx, best]
    improved = (score[r_idx, best] > 0) & (chosen > heavy_load * 1e-12)
    h_slot, p_idx, p_slot = np.unravel_index(best, (per_rank, partner.shape[1], per_rank))
    spent = x_side[r_idx, h_slot, p_idx] + y_side[r_idx, p_idx, p_slot]
    return (
        improved,
        heavy,
        h_slot,
        partner[r_idx, p_idx],
        p_slot,
        np.where(improved, spent, 0.0).astype(np.int64),
    )


def received_count(slots: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """int64 [B]: experts present on a rank in ``slots`` that the rank did not hold in ``kept``
    (both int64 [B, R, S]; no expert twice on one rank)."""
    new = ~(kept[:, :, None, :] == slots[..., None]).any(3) & (slots >= 0)  # [B, R, S]
    return new.reshape(slots.shape[0], -1).sum(1)


def _balance(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [B]: mean / max rank load of every row (1.0 for a row without load)."""
    counts = np.maximum(expert_counts(slots, load.shape[1]), 1)
    rank_load = slot_loads(slots, load / counts).sum(2)
    peak = rank_load.max(1)
    return np.where(peak > 0, rank_load.mean(1) / np.maximum(peak, 1e-300), 1.0)


def _replica_counts_of(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, E]: replicas of each expert in ``slots``."""
    return expert_counts(slots, num_experts)


def repair(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [B, R, S]: ``kept`` repaired for ``load``: missing replicas placed, then swaps.

    Args:
        load: float64 [B, E].
        kept: int64 [B, R, S], what the ranks hold now, no expert twice on one rank.
        target: float64 [B], balancedness at which swapping stops.
        budget: int64 [B], most weights received per row (experts without any replica are
            placed regardless).
        counts: int64 [B, E], the replica counts wanted if already known (see
            :func:`elastic_ep.eplb.replication.replica_counts`).
    """
    _, ranks, per_rank = kept.shape
    num_experts = load.shape[1]
    slots = kept.copy()
    if counts is None:
        counts = replica_counts(load, ranks * per_rank, ranks)
    orphans = (_replica_counts_of(kept, num_experts) == 0).sum(1)
    if per_rank == 1:  # no swap helps: a swap of single slots only exchanges two ranks' loads
        return repair_single_slot(kept, load, counts, np.maximum(budget - orphans, 0))
    fill_missing(slots, load, counts, np.maximum(budget - orphans, 0))
    swap_towards(slots, kept, load, target, budget, max_steps=ranks * per_rank)
    # Rows still short of their target: once more, each heavy rank with more partners.
    short = np.flatnonzero(_balance(slots, load) < target)
    if short.size and ranks > 4 * SWAP_PARTNERS:
        part = slots[short]
        swap_towards(
            part,
            kept[short],
            load[short],
            target[short],
            budget[short],
            max_steps=ranks * per_rank,
            partners=min(ranks // 4, WIDE_PARTNERS),
        )
        slots[short] = part
    return slots
