"""Packing replicas onto ranks, vectorised over a batch of independent rows (layers).

Layout used throughout: ``slots`` int64 [B, R, S] holds the logical expert in slot ``s`` of rank
``r`` (-1 = empty); ``per_replica`` float64 [B, E] is each expert's load divided by its replica
count, so a slot's load is ``per_replica[b, slots[b, r, s]]``.

Two steps:

1. :func:`pack_rounds`: S rounds; in each, the next R heaviest replicas go to the ranks sorted by
   current load, heaviest replica to the lightest rank.
   The replicas of one expert are adjacent in that order, so only the first expert of a round
   can already be on a rank (from the previous round); its replicas go to ranks lacking it.
2. :func:`improve_by_swaps`: repeatedly move load off the heaviest ranks of every row at once by
   the best single swap (or move into an empty slot) with one of the lightest ranks; a row
   stops once its heaviest rank finds no swap, or, given a ``floor``, is at or under it.

A fresh plan (:func:`static_slots`) runs both steps in a slot-major layout, [S, B * R] with
int16 ids where they fit: a swap step's arrays then have the rank pairs on their last axis
([S, n], [S, S, n] for n pairs), and numpy runs its inner loops along that long axis instead of
one of S (several times faster at these sizes); the plan is turned back to [B, R, S] once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from elastic_ep.eplb.replication import ascending_order, descending_order, replica_counts

_SWAP_PAIR_BUDGET = 256  # rows x rank pairs per swap step: keeps a step's arrays small
_SIGN = np.iinfo(np.int64).min


def sorted_replicas(
    counts: np.ndarray, per_replica: np.ndarray, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every replica, heaviest first: expert ids int64 [B, num_items] (-1 padded) and their
    loads float64 [B, num_items] (0 padded).

    Args:
        counts: int64 [B, E], replicas per expert; every row sums to the same total <= num_items.
        per_replica: float64 [B, E], load of one replica of each expert.
        num_items: width of the result (R * S).
    """
    rows = counts.shape[0]
    order, flat, repeats = _by_weight(counts, per_replica)
    items = _padded(np.repeat(order, repeats), rows, num_items, -1)
    weight = _padded(np.repeat(per_replica.take(flat), repeats), rows, num_items, 0.0)
    return items, weight


def sorted_items(counts: np.ndarray, per_replica: np.ndarray, num_items: int) -> np.ndarray:
    """The expert ids of :func:`sorted_replicas` alone, int64 [B, num_items]."""
    order, _, repeats = _by_weight(counts, per_replica)
    return _padded(np.repeat(order, repeats), counts.shape[0], num_items, -1)


def _by_weight(
    counts: np.ndarray, per_replica: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's experts, heaviest replica first, int64 [B * E], as expert ids and as flat
    indices into [B, E]; and their replica counts int64 [B * E]. Repeating ids or loads by the
    counts lists every replica of all rows at once, in sequential memory order."""
    rows, num_experts = counts.shape
    order = descending_order(per_replica)
    flat = (order + np.arange(rows)[:, None] * num_experts).ravel()
    return order.ravel(), flat, counts.take(flat)


def _padded(flat: np.ndarray, rows: int, num_items: int, fill: float) -> np.ndarray:
    """[rows, num_items]: ``flat`` [rows * T] (T <= num_items per row) as rows, padded with
    ``fill``."""
    if flat.size == rows * num_items:
        return flat.reshape(rows, num_items)
    out = np.full((rows, num_items), fill, dtype=flat.dtype)
    out[:, : flat.size // rows] = flat.reshape(rows, -1)
    return out


def slot_loads(slots: np.ndarray, per_replica: np.ndarray) -> np.ndarray:
    """float64 [B, R, S]: load of every slot (0 for an empty one)."""
    rows, num_experts = per_replica.shape
    padded = np.zeros((rows, num_experts + 1))
    padded[:, 1:] = per_replica
    flat = slots.reshape(rows, -1) + (np.arange(rows)[:, None] * (num_experts + 1) + 1)
    return padded.ravel()[flat].reshape(slots.shape)


def pack_rounds(
    items: np.ndarray, weight: np.ndarray, num_ranks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicas dealt to ranks in S rounds of R, heaviest to lightest rank: expert per slot
    int64 [B, R, S], load per slot float64 [B, R, S] and load per rank float64 [B, R].

    A round sorts the ranks by their load without its float's last log2(R) bits, where the
    load a round sorts by is the one the previous round sorted by (so truncated) plus the
    previous round's item (the rank loads returned are the exact sums).

    Args:
        items: int64 [B, R*S], expert ids heaviest first, -1 = empty (from
            :func:`sorted_replicas`).
        weight: float64 [B, R*S], the load of every item.
        num_ranks: R.
    """
    rows = items.shape[0]
    slots, slot_weight, rank_load = _deal(items, weight, num_ranks)
    return (
        _rank_major(slots, rows, num_ranks, np.int64),
        _rank_major(slot_weight, rows, num_ranks, np.float64),
        rank_load.reshape(rows, num_ranks),
    )


def _rank_major(table: np.ndarray, rows: int, ranks: int, dtype: type) -> np.ndarray:
    """[B, R, S] of ``dtype``: a slot-major ``table`` [S, B * R] (see :func:`_deal`) as a
    contiguous copy."""
    return np.ascontiguousarray(table.T, dtype=dtype).reshape(rows, ranks, -1)


def _deal(
    items: np.ndarray, weight: np.ndarray, num_ranks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`pack_rounds` in the slot-major layout the swaps use: expert per slot [S, B * R]
    (int16 where R * S < 2^15, else int64: narrower ids compare faster), load per slot float64
    [S, B * R] (slot s of rank r of row b at [s, b * R + r]) and load per rank float64
    [B * R]."""
    rows, num_items = items.shape
    per_rank = num_items // num_ranks
    chunks = items.reshape(rows, per_rank, num_ranks)
    weights = weight.reshape(rows, per_rank, num_ranks)
    bits = max(1, (num_ranks - 1).bit_length())
    low = np.int64((1 << bits) - 1)
    load_bits = ~low & ~_SIGN  # a key's load, without the sign bit the straddle sort may set
    # Round-major, so that a round's targets are contiguous (strided [B, R] operands run R-long
    # inner loops).
    targets = np.empty((per_rank, rows, num_ranks), dtype=np.int64)
    # The ranks in the order of the last round's items (round 0 meets ranks of equal, zero
    # load: rank id order) and their loads in that order, so that a round adds its items'
    # loads without indexing; the loads are read back from the sorted keys, which drop their
    # last log2(R) bits (below any load difference that the sort sees).
    order = targets[0] = np.arange(num_ranks)
    # One array, in place: the rank loads (float64) in the order of the last round's items,
    # then their keys (int64), sorted.
    loads = weights[:, 0].copy()
    keys = loads.view(np.int64)
    for k, straddle in enumerate(_straddling_rows(chunks), start=1):
        # Ranks by load, lightest first, as one integer sort (see ``descending_order``).
        keys &= ~low
        keys |= order
        if straddle is None:
            keys.sort(axis=1)
        else:  # the straddling rows' keys in the previous round's item order, then the sort
            by_item = keys[straddle.rows]
            keys.sort(axis=1)
            _avoid_second_replica(keys, by_item, straddle)
        order = np.bitwise_and(keys, low, out=targets[k])
        keys &= load_bits
        loads += weights[:, k]
    # Each item's cell in [S, B * R]: round * B * R + row * R + rank, in the items' order.
    targets += (np.arange(per_rank) * (rows * num_ranks))[:, None, None] + (
        np.arange(rows) * num_ranks
    )[:, None]
    cells = targets.transpose(1, 0, 2).reshape(-1)
    ids = np.int16 if num_items < 2**15 else np.int64
    slots = np.empty((per_rank, rows * num_ranks), dtype=ids)
    slots.reshape(-1)[cells] = chunks.reshape(-1).astype(ids)  # faster cast first
    slot_weight = np.empty((per_rank, rows * num_ranks))
    slot_weight.reshape(-1)[cells] = weights.reshape(-1)
    # Exact rank loads, summed round by round (a sum over the leading axis adds row by row).
    return slots, slot_weight, slot_weight.sum(0)


class _Straddle(NamedTuple):
    """The rows of one round k >= 1 whose first expert also ended round k - 1."""

    rows: np.ndarray  # int64 [n]
    # int64 [n, R]: the sign bit on the items of round k - 1 that are not that expert, else 0
    sign: np.ndarray
    # int64 [n, R]: a mask clearing the sign bit on the items of round k after its replicas of
    # that expert, else all ones
    clear: np.ndarray


def _straddling_rows(chunks: np.ndarray) -> list[_Straddle | None]:
    """For each round k >= 1 its straddling rows, or ``None`` where no row straddles.

    ``chunks``: int64 [B, S, R], the items of every round.
    """
    first = chunks[:, 1:, 0]  # [B, S - 1]
    straddle = (chunks[:, :-1, -1] == first) & (first >= 0)
    rounds, rows = np.nonzero(straddle.T)  # grouped by round
    if rows.size == 0:
        return [None] * first.shape[1]
    # The rounds k - 1 and k of the straddling rows, [n, R] each (C-ordered gathers).
    at = rows * chunks.shape[1] + rounds
    previous = chunks.reshape(-1, chunks.shape[2]).take(at, axis=0)
    current = chunks.reshape(-1, chunks.shape[2]).take(at + 1, axis=0)
    expert = current[:, :1]
    sign = np.where(previous != expert, _SIGN, 0)
    span = (current != expert).argmax(1)  # leading items equal to it
    clear = np.where(np.arange(chunks.shape[2]) >= span[:, None], ~_SIGN, -1)
    counts = np.bincount(rounds, minlength=first.shape[1])
    ends = np.cumsum(counts)
    result: list[_Straddle | None] = []
    for start, end in zip((ends - counts).tolist(), ends.tolist(), strict=True):
        part = slice(start, end)
        result.append(_Straddle(rows[part], sign[part], clear[part]) if end > start else None)
    return result


def _avoid_second_replica(keys: np.ndarray, by_item: np.ndarray, straddle: _Straddle) -> None:
    """Reorder ``keys`` int64 [B, R] (load | rank, sorted: lightest rank first) in place so that
    in each straddling row this round's replicas of the straddling expert take the lightest
    ranks that did not receive it in the previous round; the other items keep the load order.

    ``by_item``: int64 [n, R], the keys of the straddling rows' ranks in the order of the
    items they received in the previous round (modified).

    Replicas of one expert are adjacent in the item order, so that is the only way a rank could
    get a second replica. There are enough ranks lacking it: an expert has at most R replicas.
    """
    # Keys in the previous round's item order; ranks lacking the expert negative, so they sort
    # first: the leading ones are the chosen ranks, which stay negative in a second sort.
    by_item += straddle.sign
    by_item.sort(axis=1)
    by_item &= straddle.clear
    by_item.sort(axis=1)
    keys[straddle.rows] = by_item


def presence_of(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, R, E + 1]: copies of each expert on each rank; column 0 counts empty slots."""
    rows, ranks, _ = slots.shape
    cell = np.arange(rows * ranks).reshape(rows, ranks, 1) * (num_experts + 1)
    flat = np.bincount((cell + slots + 1).ravel(), minlength=rows * ranks * (num_experts + 1))
    return flat.reshape(rows, ranks, num_experts + 1)


def expert_counts(slots: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [B, E]: replicas of each expert in ``slots`` int64 [B, R, S] (-1 = empty)."""
    rows = slots.shape[0]
    cell = (np.arange(rows) * (num_experts + 1) + 1)[:, None] + slots.reshape(rows, -1)
    flat = np.bincount(cell.ravel(), minlength=rows * (num_experts + 1))
    return flat.reshape(rows, num_experts + 1)[:, 1:]


def improve_by_swaps(
    slots: np.ndarray,
    weight: np.ndarray,
    *,
    max_steps: int,
    pairs: int | None = None,
    loads: np.ndarray | None = None,
    floor: np.ndarray | None = None,
) -> None:
    """Lower the heaviest ranks of every row in place by swaps that keep replicas distinct.

    Each step, in every row still improving, applies the swap (or move into an empty slot) that
    lowers the larger load of a rank pair the most: with ``pairs=None`` between the heaviest
    rank and any other; with ``pairs=k``, for each of the k heaviest ranks with its counterpart
    among the k lightest (heaviest with lightest). The pairs share no rank, so their swaps are
    independent. A row stops when no pair improves (``pairs=None``) or when its heaviest rank's
    pair does not (``pairs=k``: that pair is the same next step, so the row's heaviest rank
    could not go lower).

    Args:
        slots: int64 [B, R, S], modified in place.
        weight: float64 [B, R, S], load of every slot, modified in place along with ``slots``.
        max_steps: most swap steps per row.
        pairs: rank pairs per step (at most R // 2), or ``None`` for heaviest-vs-all.
        loads: float64 [B, R], load of every rank if known (from :func:`pack_rounds`),
            modified in place; summed from ``weight`` otherwise.
        floor: float64 [B], a load no row need go below: a row stops once its heaviest rank
            is at or under it (hierarchical plans: the heaviest node's mean rank load of the
            row's layer, which that node's heaviest rank never undercuts, so a lighter node's
            swaps below it would not change the layer's heaviest rank).
    """
    rows, ranks, per_rank = slots.shape
    if ranks < 2:
        return
    flat_slots = slots.reshape(-1, per_rank)  # one row per (row, rank): gathers stay flat
    flat_weight = weight.reshape(-1, per_rank)
    # [B * R], kept up to date by the swaps
    loads = flat_weight.sum(1) if loads is None else loads.reshape(-1)
    if pairs is not None:  # in the slot-major layout of the rounds, then back
        by_slot, by_slot_weight = flat_slots.T.copy(), flat_weight.T.copy()
        _pair_swaps(by_slot, by_slot_weight, loads, ranks, min(pairs, ranks // 2), max_steps, floor)
        flat_slots[...] = by_slot.T
        flat_weight[...] = by_slot_weight.T
        return
    num_experts = int(flat_slots.max()) + 1
    cells = (slots.reshape(-1), weight.reshape(-1))  # views: swaps index single cells
    active = np.arange(rows)
    for _ in range(max_steps):
        if floor is not None:
            heaviest = loads.reshape(rows, ranks)[active].max(1)
            active = active[heaviest > floor[active]]
            if active.size == 0:
                return
        improved, heavy, h_slot, light, l_slot = _best_swaps(
            flat_slots, flat_weight, loads, active, ranks, num_experts
        )
        heavy, light = heavy[improved], light[improved]
        h_cell = heavy * per_rank + h_slot[improved]
        l_cell = light * per_rank + l_slot[improved]
        moved = cells[1][h_cell] - cells[1][l_cell]
        loads[heavy] -= moved
        loads[light] += moved
        for table in cells:
            a, b = table[h_cell], table[l_cell]
            table[h_cell], table[l_cell] = b, a
        active = active[improved.any(1)]
        if active.size == 0:
            return


def _pair_swaps(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    ranks: int,
    pairs: int,
    max_steps: int,
    floor: np.ndarray | None,
) -> None:
    """:func:`improve_by_swaps` with ``pairs`` rank pairs per step, on the slot-major ``slots``
    (signed integers) / ``weight`` float64 [S, B * R] (see :func:`_deal`) and ``loads``
    float64 [B * R] (all modified in place).

    The pairs are the last axis of every per-step array ([S, n], [S, S, n] for n pairs): numpy
    runs its inner loops along it, many times faster than along an axis of S. A pair whose best
    swap does not improve it swaps a cell with itself (a no-op), so that every pair of a step
    is applied by the same few whole-array operations.
    """
    per_rank, width = slots.shape
    flat_slots, flat_weight = slots.reshape(-1), weight.reshape(-1)  # swaps index single cells
    by_row = loads.reshape(-1, ranks)
    rows = by_row.shape[0]
    active = np.arange(rows)
    low = (1 << max(1, (ranks - 1).bit_length())) - 1
    rank_ids = np.arange(ranks)
    # Columns of the ranks sorted by load: the k heaviest, heaviest first, then the k lightest.
    ends = np.concatenate((np.arange(ranks - 1, ranks - 1 - pairs, -1), np.arange(pairs)))
    column = np.arange(rows * pairs)
    # Offsets of the cells of a swap (heavy slot * S + light slot) from its ranks' columns:
    # [2, S * S], the heavy slot's row, then the light slot's.
    offsets = np.stack(np.divmod(np.arange(per_rank * per_rank), per_rank)) * width
    # Non-negative floats order like their bit patterns: integer maxima and comparisons.
    bits = by_row.view(np.int64)
    floor_bits = None if floor is None else floor.view(np.int64)
    for _ in range(max_steps):
        if floor_bits is not None:
            active = active[bits[active].max(1) > floor_bits[active]]
        if active.size == 0:
            return
        # Ranks by load, lightest first (``ascending_order``).
        keys = (bits if active.size == rows else bits[active]) & ~low
        keys |= rank_ids
        keys.sort(axis=1)
        pair = keys.T.take(ends, axis=0)  # [2k, A]
        pair &= low
        pair += active * ranks
        n = active.size * pairs
        pair = pair.reshape(2, n)  # heavy ranks, then their light partners, pair-major
        heavy, light = pair[0], pair[1]
        # [S, 2n]: the heavy ranks' items, then the light ones' (``take``: a C-ordered result)
        held = slots.take(pair.reshape(-1), axis=1)
        pair_load = loads.take(pair)
        heavy_load = pair_load[0]
        half_gap = 0.5 * (heavy_load - pair_load[1])  # [n]
        heavy_x, light_x = held[:, :n], held[:, n:]
        # Whether heavy item i and light item j are the same expert (or both empty): [S, S, n].
        same = heavy_x[:, None, :] == light_x[None, :, :]
        # A swap moving d = (heavy item - light item) leaves max(H - d, P + d)
        # = (H + P) / 2 + |d - c| with c the half gap: the best minimises |d - c|. A heavy
        # item the light rank holds weighs -inf, a light item the heavy rank holds +inf:
        # |d - c| is then inf and the swap never wins.
        both_w = weight.take(pair.reshape(-1), axis=1)
        heavy_w = np.where(same.any(1), -np.inf, both_w[:, :n] - half_gap)
        light_w = np.where(same.any(0) & (light_x >= 0), np.inf, both_w[:, n:])
        distance = np.subtract(heavy_w[:, None, :], light_w[None, :, :]).reshape(-1, n)
        np.abs(distance, out=distance)
        best = distance.argmin(0)  # heavy slot * S + light slot
        chosen = distance[best, column[:n]]
        # The new larger load of the pair, H - c + |d - c|, must be below H.
        improved = heavy_load - half_gap + chosen < heavy_load * (1 - 1e-12)
        cell = offsets.take(best, axis=1)  # [2, n]: the heavy cell, then the light one
        cell += pair
        cell[1] = np.where(improved, cell[1], cell[0])  # else: a no-op
        # The swap: the cells [heavy, light] take the values of [light, heavy].
        target, source = cell.reshape(-1), cell[::-1].reshape(-1)
        values = flat_weight.take(source)
        moved = values[n:] - values[:n]
        loads[heavy] -= moved
        loads[light] += moved
        flat_weight[target] = values
        flat_slots[target] = flat_slots.take(source)
        # A row whose heaviest rank found no swap keeps its heaviest rank: its pair (with the
        # lightest rank) is the same next step, the other pairs only lower their heavy ranks.
        active = active[improved[: active.size]]


def _best_swaps(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    active: np.ndarray,
    ranks: int,
    num_experts: int,
) -> tuple[np.ndarray, ...]:
    """Best swap of the heaviest rank of each ``active`` row [A] with any other rank:
    (improved, heavy rank, heavy slot, partner rank, partner slot), each [A, 1]; the R ranks of
    a row are rows of the flat ``slots`` int64 (ids < ``num_experts``) / ``weight`` float64
    [B * R, S], ``loads`` float64 [B * R]."""
    per_rank = slots.shape[1]
    first_rank = (active * ranks)[:, None]
    by_load = ascending_order(loads[first_rank + np.arange(ranks)]) + first_rank  # [A, R]
    heavy = by_load[:, -1:]  # one heavy rank, R - 1 partners
    partner = by_load[:, None, :-1]
    shape, width = partner.shape, per_rank * per_rank
    heavy_x = slots[heavy]  # [A, k, S]
    part_x = slots[partner]  # [A, k, M, S]
    heavy_load = loads[heavy]  # [A, k]
    part_load = loads[partner]  # [A, k, M]
    # What each rank involved holds, as a bool table with a row per rank and a column per
    # expert + 1 (column 0: an empty slot): row i of heavy rank i, row n + j of partner j.
    cols = num_experts + 1
    n = heavy.size
    held = np.zeros((n + partner.size) * cols, dtype=bool)
    table_row = np.arange(0, held.size, cols) + 1
    heavy_row = table_row[:n].reshape(heavy.shape)
    part_row = table_row[n:].reshape(shape)
    held[heavy_x + heavy_row[..., None]] = True
    held[part_x + part_row[..., None]] = True
    on_partner = held[heavy_x[:, :, None, :] + part_row[..., None]]  # [A, k, M, S]
    on_heavy = held[part_x + heavy_row[..., None, None]] & (part_x >= 0)
    # A swap moving d = (heavy item - partner item) leaves max(H - d, P + d)
    # = (H + P) / 2 + |d - (H - P) / 2|, so the best swap minimises |d - c| + P / 2 with
    # c = (H - P) / 2 folded into the heavy side: one [A, k, M, S, S] difference and its
    # absolute value. A heavy item the partner already holds weighs -inf, a partner item the
    # heavy rank holds +inf: |d - c| is then inf and the swap never wins.
    half_gap = 0.5 * (heavy_load[:, :, None] - part_load)  # [A, k, M]
    heavy_w = np.where(on_partner, -np.inf, weight[heavy][:, :, None, :] - half_gap[..., None])
    part_w = np.where(on_heavy, np.inf, weight[partner])
    distance = np.subtract(heavy_w[..., :, None], part_w[..., None, :])  # [A, k, M, S, S]
    np.abs(distance, out=distance)
    row = np.arange(n)
    if shape[2] == 1:  # one partner per heavy rank: the best |d - c| is read off
        best = distance.reshape(n, width).argmin(1)
        chosen = distance.reshape(n, width)[row, best]
        gap, partner = half_gap.reshape(n), partner.reshape(heavy.shape)
    else:  # partners of different loads: compare (H + P) / 2 + |d - c|
        distance += (0.5 * part_load)[..., None, None]
        p_idx, best = np.divmod(distance.reshape(n, -1).argmin(1), width)
        chosen = np.abs(
            heavy_w.reshape(n, -1, per_rank)[row, p_idx, best // per_rank]
            - part_w.reshape(n, -1, per_rank)[row, p_idx, best % per_rank]
        )
        gap = half_gap.reshape(n, -1)[row, p_idx]
        partner = partner.reshape(n, -1)[row, p_idx].reshape(heavy.shape)
    x_slot, y_slot = np.divmod(best, per_rank)
    # The new larger load of the chosen pair, H - c + |d - c|, must be below H.
    improved = heavy_load.ravel() - gap + chosen < heavy_load.ravel() * (1 - 1e-12)
    return (
        improved.reshape(heavy.shape),
        heavy,
        x_slot.reshape(heavy.shape),
        partner,
        y_slot.reshape(heavy.shape),
    )


def static_slots(
    load: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    swap_steps: int,
    counts: np.ndarray | None = None,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """int64 [B, R, S]: a fresh plan per row, ignoring any previous placement.

    Args:
        load: float64 [B, E], finite, non-negative.
        num_ranks: R; slots_per_rank: S (R * S >= E).
        swap_steps: improvement swaps per row after the rounds.
        counts: int64 [B, E], :func:`replica_counts` of these arguments if already known.
        floor: float64 [B], load under which a row's swaps stop (:func:`improve_by_swaps`).
    """
    if counts is None:
        counts = replica_counts(load, num_ranks * slots_per_rank, num_ranks)
    per_replica = load / counts
    if slots_per_rank == 1:  # one round, in rank order; a swap of single slots would only
        # exchange two ranks' loads
        return sorted_items(counts, per_replica, num_ranks).reshape(-1, num_ranks, 1)
    items, weight = sorted_replicas(counts, per_replica, num_ranks * slots_per_rank)
    slots, slot_weight, rank_load = _deal(items, weight, num_ranks)
    if num_ranks > 1:
        pairs = min(max(1, _SWAP_PAIR_BUDGET // load.shape[0]), num_ranks // 2)
        _pair_swaps(slots, slot_weight, rank_load, num_ranks, pairs, swap_steps, floor)
    return _rank_major(slots, load.shape[0], num_ranks, np.int64)
