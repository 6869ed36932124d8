"""Swaps for the movement-aware repair: exchange slots between heavy and light ranks.

Works on the layout of :mod:`elastic_ep.eplb.packing` (``slots`` int64 [B, R, S], -1 = empty),
batched over rows (layers or (layer, node) pairs). ``kept`` is what the ranks held before the
change; a weight "received" is an expert on a rank that did not hold it in ``kept``.

:func:`swap_towards` swaps between heavy and light ranks, best load gain per weight received
first, until the row reaches its target balancedness, no swap helps, or the budget is spent.
Each step improves up to ``SWAP_PAIRS`` heavy ranks per row, each with its own light partners.
Swaps that undo an earlier transfer are free. A slot's load travels with it: the equal split of
its expert's load, or the load its routing share gives it (``slot_weight``), so that the swaps
aim at the ranks that stay heavy once shares have moved what they can.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.expert_bits import before_codes, code_of, swap_codes, trade_codes
from elastic_ep.eplb.packing import expert_counts, slot_loads
from elastic_ep.eplb.replication import ascending_order

SWAP_PARTNERS = 8  # light ranks tried as swap partners of one heavy rank
SWAP_PAIRS = 16  # most heavy ranks of one row improved per step, each with its own partners
CANDIDATE_BLOCK = 1 << 16  # candidate swaps per block of heavy ranks (float64 elements)
WIDE_CANDIDATES = 4096  # candidates of a block from which its broadcasts repeat first (timed)
SUM_COLUMNS = 512  # slot_sum by columns from this many sums with S >= 8 (timed on numpy 2)
ANY_REDUCE_SLOTS = 100  # any_slot reduces at once up to this x S results (timed on numpy 2)
ORDER_BITS_FROM = 16  # ranks from which swap steps and fill chunks order ranks by an integer sort
_FREE_SWAP_COST = 0.25  # denominator floor: a swap that costs nothing still needs a real gain
# Transfers one side of a swap costs by the receiving rank's code (1 x held now + 2 x held
# before): 1 if it never held the expert, 0 if it held it before, never if it holds it now.
_SIDE_COST = np.array([1.0, np.inf, 0.0, np.inf])


def swap_towards(
    slots: np.ndarray,
    kept: np.ndarray,
    load: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    max_steps: int,
    partners: int = SWAP_PARTNERS,
    slot_weight: np.ndarray | None = None,
    before: np.ndarray | None = None,
    row_steps: np.ndarray | None = None,
) -> None:
    """Improve ``slots`` in place by swaps, see the module docstring.

    Args:
        slots: int64 [B, R, S], C-contiguous (updated through flat views), no expert twice
            on one rank.
        kept: int64 [B, R, S], what the ranks held before (defines what costs a transfer).
        load: float64 [B, E].
        target: float64 [B], balancedness at which a row stops.
        budget: int64 [B], the most weights a row may receive in total.
        max_steps: most swaps per row.
        partners: light ranks tried with each heavy rank (at most R / 4).
        slot_weight: float64 [B, R, S], C-contiguous, the load of each slot (0 for empty
            ones), moved with the slots in place; ``None``: the equal split of each expert's
            load over its replicas.
        before: int64 [B * R, W], :func:`before_codes` of ``kept`` if the caller keeps it
            across calls; built here where ``None``.
        row_steps: int64 [B], most swap steps of each row (``max_steps`` for all where
            ``None``).
    """
    rows, ranks, per_rank = slots.shape
    num_experts = load.shape[1]
    if slot_weight is None:
        per_replica = load / np.maximum(expert_counts(slots, num_experts), 1)
        slot_weight = slot_loads(slots, per_replica)
    if ranks < 2:
        return
    # Flat layouts, one row per (row, rank) and one entry per slot, so that every gather is a
    # single index (several times cheaper than a pair of index arrays on these small arrays).
    weight = slot_weight.reshape(-1, per_rank)
    flat_slots = slots.reshape(-1, per_rank)
    every_slot, every_weight = flat_slots.reshape(-1), weight.reshape(-1)
    if before is None:
        before = before_codes(kept.reshape(-1, per_rank), num_experts)
    codes = swap_codes(flat_slots, before)
    # Which slots hold a weight received (kept up to date with the swaps): the heavy rank's
    # side of every candidate swap needs it.
    fresh = received_codes(codes, flat_slots)
    every_fresh = fresh.reshape(-1)
    spent = fresh.reshape(rows, -1).sum(1)
    loads = slot_sum(weight)
    by_row = loads.reshape(rows, ranks)
    # Fewer partners per heavy rank on few ranks, so that several heavy ranks move per step.
    partners = min(partners, max(1, ranks // 4))
    pairs = max(1, min(SWAP_PAIRS, ranks // (partners + 1)))
    active = np.arange(rows)
    # The candidate arrays of every step, allocated once: fresh arrays of this size are fresh
    # pages (page faults and zeroing) at every step, several times the arithmetic on them.
    block = _block_rows(per_rank, partners)
    work = np.empty((2, min(block, rows * pairs) * per_rank * partners * per_rank))
    if row_steps is not None:
        max_steps = min(max_steps, int(row_steps.max(initial=0)))
    for done in range(max_steps):
        rank_loads = by_row[active]
        peak = np.maximum.reduce(rank_loads, axis=1)
        mean = np.add.reduce(rank_loads, axis=1) / ranks  # what .mean(1) gives
        balance = mean / np.maximum(peak, 1e-300)
        keep = (balance < target[active]) & (spent[active] < budget[active])
        if row_steps is not None:
            keep &= row_steps[active] > done
        if not keep.all():
            active, rank_loads, mean = active[keep], rank_loads[keep], mean[keep]
            if active.size == 0:
                return
        # The `pairs` heaviest ranks, each with its own `partners` of the lightest, disjoint:
        # the i-th heaviest gets the lightest ranks i, i + pairs, i + 2 * pairs, ...
        order = lightest_first(rank_loads) + (active * ranks)[:, None]
        heavy = order[:, : -pairs - 1 : -1]  # [A, k]
        partner = order[:, : pairs * partners].reshape(-1, partners, pairs).transpose(0, 2, 1)
        # Heavy ranks after the first only while above the row's target peak.
        wanted = loads[heavy] > (mean / target[active])[:, None]
        wanted[:, 0] = True
        row, which = wanted.nonzero()
        left = (budget[active] - spent[active]) // wanted.sum(1)
        found = _best_paid_swap(
            flat_slots,
            weight,
            loads,
            (codes, fresh),
            heavy[row, which],
            partner[row, which],
            left[row],
            work,
        )
        chosen = found[0].nonzero()[0]
        if chosen.size == 0:
            return
        h_rank, h_slot, p_rank, p_slot, cost = (part[chosen] for part in found[1:])
        h_at, p_at = h_rank * per_rank + h_slot, p_rank * per_rank + p_slot
        x, y = every_slot[h_at], every_slot[p_at]
        wx, wy = every_weight[h_at], every_weight[p_at]
        every_slot[h_at], every_slot[p_at] = y, x
        every_weight[h_at], every_weight[p_at] = wy, wx
        loads[h_rank] += wy - wx
        loads[p_rank] += wx - wy
        trade_codes(codes, h_rank, p_rank, x, y)
        moved = np.concatenate([h_at, p_at])
        every_fresh[moved] = code_of(codes, moved // per_rank, every_slot[moved]) < 2
        np.add.at(spent, active[row[chosen]], cost)
        still = np.zeros(rows, dtype=bool)
        still[active[row[chosen]]] = True
        active = still.nonzero()[0]


def _best_paid_swap(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    bits: tuple[np.ndarray, np.ndarray],
    heavy: np.ndarray,
    partner: np.ndarray,
    left: np.ndarray,
    work: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Best swap per heavy rank by load gain per transfer, with one of its partners; returns
    (improved, heavy rank, heavy slot, partner rank, partner slot, transfers it costs), each
    [A], ranks as flat ids.

    Args:
        slots, weight: int64 / float64 [B * R, S]; loads: float64 [B * R].
        bits: :func:`swap_codes` of what every rank holds now and held before, and
            :func:`received_codes` of ``slots`` (bool [B * R, S]).
        heavy: int64 [A], flat ids of the heavy ranks; partner: int64 [A, M], their partners
            (no rank in two of these).
        left: int64 [A], transfers each heavy rank's swap may spend.
        work: float64 [2, N], room for two candidate arrays of a block of heavy ranks
            (N >= min(A, :func:`_block_rows`) x S x M x S), overwritten.
    """
    # In blocks of heavy ranks, so that the candidate arrays stay in cache.
    block = _block_rows(slots.shape[1], partner.shape[1])
    if heavy.size <= block:
        return _best_paid_swap_block(slots, weight, loads, bits, heavy, partner, left, work)
    parts = [
        _best_paid_swap_block(
            slots,
            weight,
            loads,
            bits,
            heavy[i : i + block],
            partner[i : i + block],
            left[i : i + block],
            work,
        )
        for i in range(0, heavy.size, block)
    ]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _block_rows(per_rank: int, partners: int) -> int:
    """Heavy ranks per block of :func:`_best_paid_swap`: S x M x S candidates each, about
    ``CANDIDATE_BLOCK`` in all (at least one heavy rank)."""
    return max(1, CANDIDATE_BLOCK // (per_rank**2 * partners))


def _best_paid_swap_block(
    slots: np.ndarray,
    weight: np.ndarray,
    loads: np.ndarray,
    bits: tuple[np.ndarray, np.ndarray],
    heavy: np.ndarray,
    partner: np.ndarray,
    left: np.ndarray,
    work: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """:func:`_best_paid_swap` for one block of heavy ranks (same arguments and result)."""
    rows, many = partner.shape
    per_rank = slots.shape[1]
    heavy_load = loads[heavy]
    heavy_x, part_x = slots[heavy], slots[partner]  # [A, S], [A, M, S]
    # Candidate swaps as [A, S, M, S] (heavy slot, partner, partner slot), in ``work``.
    shape = (rows, per_rank, many, per_rank)
    size = rows * per_rank * many * per_rank
    delta, gain = work[0, :size].reshape(shape), work[1, :size].reshape(shape)
    np.subtract(weight[heavy][:, :, None, None], weight[partner][:, None, :, :], out=delta)
    # Broadcasting along the short last axis runs numpy's inner loop S elements at a time: in
    # large blocks the operands that vary per partner, not per partner slot, are first
    # repeated over the slots (the same differences and sums, about half the time).
    wide = size >= WIDE_CANDIDATES
    # Gain = heavy load - max(heavy load - delta, partner load + delta).
    gap = (heavy_load[:, None] - loads[partner])[:, None, :, None]  # [A, 1, M, 1]
    np.subtract(gap.repeat(per_rank, 3) if wide else gap, delta, out=gain)
    np.minimum(delta, gain, out=gain)
    # Transfers: x received by the partner (unless it held x before) minus the one it had cost
    # the heavy rank, and likewise for y going the other way; each side is -1, 0 or 1, or
    # "never" for a swap that would put an expert twice on one rank (a rank swapping with
    # itself too: it holds both experts, or both slots are empty and the gain is 0). An empty
    # slot is never a transfer (code 2: "held before").
    codes, fresh = bits
    x_code = code_of(codes, partner[:, None, :], heavy_x[:, :, None])  # [A, S, M]
    y_code = code_of(codes, heavy[:, None, None], part_x)  # [A, M, S]
    x_side = _SIDE_COST[x_code] - fresh[heavy][:, :, None]
    y_side = _SIDE_COST[y_code] - fresh[partner]
    # Score = gain / max(cost, 1/4) (exact: the divisor is 1/4, 1 or 2), 0 where a side is
    # not allowed (+inf) or the swap is over budget. Every allowed swap costs at most 2, so only
    # rows with less left need a budget mask.
    x_at = x_side[:, :, :, None]
    cost = np.add(x_at.repeat(per_rank, 3) if wide else x_at, y_side[:, None], out=delta)
    tight = (left < 2).nonzero()[0]
    over = cost[tight] > left[tight, None, None, None] if tight.size else None
    np.maximum(cost, _FREE_SWAP_COST, out=cost)
    score = np.divide(gain, cost, out=cost).reshape(rows, -1)
    if over is not None:
        score[tight] = np.where(over.reshape(tight.size, -1), 0.0, score[tight])
    best = score.argmax(1)
    at = np.arange(0, size, per_rank * many * per_rank) + best  # flat index of each best
    improved = (score.ravel()[at] > 0) & (gain.ravel()[at] > heavy_load * 1e-12)
    h_slot, p_idx, p_slot = np.unravel_index(best, (per_rank, many, per_rank))
    r_idx = np.arange(rows)
    spent = x_side[r_idx, h_slot, p_idx] + y_side[r_idx, p_idx, p_slot]
    return (
        improved,
        heavy,
        h_slot,
        partner[r_idx, p_idx],
        p_slot,
        np.where(improved, spent, 0.0).astype(np.int64),
    )


def received_codes(codes: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """bool [N, S]: slots of ``slots`` (int64 [N, S]) holding an expert that row n did not
    hold before, by ``codes`` (:func:`swap_codes`; an empty slot: never)."""
    return code_of(codes, np.arange(slots.shape[0])[:, None], slots) < 2


def received_count(slots: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """int64 [B]: experts present on a rank in ``slots`` that the rank did not hold in ``kept``
    (both int64 [B, R, S]; no expert twice on one rank)."""
    return received_slots(slots, kept).reshape(slots.shape[0], -1).sum(1)


def received_slots(slots: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """bool [B, R, S]: the slots of ``slots`` holding an expert their rank did not hold in
    ``kept`` (both int64 [B, R, S])."""
    held = kept[:, :, 0, None] == slots  # [B, R, S]: one comparison per kept slot
    for column in range(1, kept.shape[2]):
        held |= kept[:, :, column, None] == slots
    return ~held & (slots >= 0)


def any_slot(mask: np.ndarray) -> np.ndarray:
    """bool [...]: ``mask`` bool [..., S] or-ed over its last axis, column by column (several
    times faster than ``any`` over a short axis), or by one reduction where the result is small
    and S >= 4 (then the S column passes cost more than the reduction's fixed cost)."""
    per_rank = mask.shape[-1]
    if per_rank >= 4 and mask.size <= ANY_REDUCE_SLOTS * per_rank**2:
        return np.logical_or.reduce(mask, axis=-1)
    out = mask[..., 0].copy()
    for column in range(1, mask.shape[-1]):
        out |= mask[..., column]
    return out


def slot_sum(values: np.ndarray) -> np.ndarray:
    """float64 [...]: ``values`` float64 [..., S] summed over its last axis, as column adds in
    numpy's own order (the same sums), several times faster than a reduction over a short
    axis: one after another below 8; from 8 (to 128, C-contiguous, ``SUM_COLUMNS`` sums or
    more) numpy's pairwise order, eight running sums folded in pairs, then the columns past a
    multiple of 8; else numpy's sum."""
    per_rank = values.shape[-1]
    if per_rank < 8:
        out = values[..., 0].copy()
        for column in range(1, per_rank):
            out += values[..., column]
        return out
    if per_rank > 128 or values.size < SUM_COLUMNS * per_rank or not values.flags.c_contiguous:
        return values.sum(-1)
    part = [values[..., column] for column in range(8)]
    whole = per_rank - per_rank % 8
    for column in range(8, whole):
        part[column % 8] = part[column % 8] + values[..., column]
    out = (part[0] + part[1]) + (part[2] + part[3])
    out += (part[4] + part[5]) + (part[6] + part[7])
    for column in range(whole, per_rank):
        out += values[..., column]
    return out


def lightest_first(rank_loads: np.ndarray) -> np.ndarray:
    """int64 [A, R]: each row's ranks by ``rank_loads`` (float64 [A, R]), lightest first, ties
    in rank order. From ``ORDER_BITS_FROM`` ranks one integer sort of the loads' bit patterns
    carrying the rank in their last log2(R) bits (:func:`ascending_order`; loads equal but for
    those bits count as ties), 15x faster than numpy's stable float argsort at 1024 ranks. A
    load that float rounding left below zero counts as zero."""
    loads = np.where(rank_loads > 0.0, rank_loads, 0.0)  # also -0.0 to +0.0 (sign bit set)
    if loads.shape[1] < ORDER_BITS_FROM:
        return loads.argsort(axis=1, kind="stable")
    return ascending_order(loads)
