"""How many replicas each logical expert gets.

The rule is the greedy one of DeepSeek's EPLB (give the next slot to the expert with the highest
load per replica), which minimises the largest load per replica. Giving expert e its k-th extra
replica has priority ``load[e] / k``, and these priorities fall with k, so the greedy result is
one replica each plus the ``M = slots - E`` highest priorities, found with one sort per row
instead of a per-slot loop. With total load T the M-th highest priority lies between
``T / (M + E)`` and ``T / M`` (expert e has about ``load[e] / p`` priorities above p), so only
the candidates in that window, about 2E per row, are sorted; every candidate above the window
wins. With more than ``_NARROW_FROM`` experts one secant step first narrows the window to a
few standard deviations of the rounding around the cutoff (about ``sqrt(E)`` candidates); rows
where that misses take the wide window. The plain bound below is used instead where its
candidates are few per expert (``_WINDOW_FROM``) and, with many experts, in all rows together
(``_BOUNDED_UP_TO``). Where replica caps make the window miss the cutoff, the rows fall back to
the plain bound: if the expert of load rank i (heaviest first) gets k extras, so does every
heavier one, so ``(i + 1) * k <= M`` and only ``~M log M`` candidates can win.

The cutoff (the M-th highest candidate) is read off each sorted row; where no row holds another
candidate equal to its cutoff (the usual case with real loads), the winners are the candidates
at or above it, without the pass that breaks ties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_PARTITION_FROM = 4096  # candidates per row from which a partition beats the integer sort
_WINDOW_FROM = 6  # candidates per expert (plain bound) above which the window is used
# (16 experts per row x 752 rows, 85 candidates each: the plain bound 310 us, the window 475 us)
_CAP_ROUNDS = 3  # refinements of the set of experts at their replica cap
_ROUNDING = 1e-9  # relative margin of the window's ends against rounding
_NARROW = 6.0  # standard deviations of the rounding kept on either side of the estimate
# Experts per row up to which the narrowed window (2 * _NARROW * sqrt(E / 12) candidates) is
# not under half the wide one (E candidates).
_NARROW_FROM = 48
# Candidates of the plain bound in all rows from which the narrowed window (a fixed ~0.3 ms of
# calls, then ~sqrt(E) candidates per row) costs less than sorting them.
_BOUNDED_UP_TO = 16384


def replica_counts(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """int64 [B, E]: replicas per expert, >= 1 each, <= ``max_replicas``, summing to
    ``min(num_slots, E * max_replicas)`` in every row.

    Args:
        load: float64 [B, E], finite and non-negative. A row of zeros is treated as uniform.
        num_slots: slots to fill per row (>= E).
        max_replicas: most replicas one expert may get (the number of ranks, since two replicas
            of one expert never share a rank).
    """
    rows, num_experts = load.shape
    extra = min(num_slots, num_experts * max_replicas) - num_experts
    if extra in (0, num_experts * (max_replicas - 1)):  # no choice: none, or all capped
        return np.full((rows, num_experts), 1 + extra // num_experts, dtype=np.int64)
    idle = load.sum(1) == 0
    if idle.any():
        load = np.where(idle[:, None], 1.0, load)
    cap = max_replicas - 1
    bounded = np.minimum(extra // np.arange(1, min(extra, num_experts) + 1), cap).sum()
    if bounded <= _WINDOW_FROM * num_experts and (
        num_experts <= _NARROW_FROM or bounded * rows <= _BOUNDED_UP_TO
    ):  # few extras: the plain bound is small already
        return _bounded_extras(load, extra, cap) + 1
    high, low, fine = _window(load, extra, cap)
    if num_experts <= _NARROW_FROM:  # the narrowed window would be about as wide
        extras, missed = _window_extras(load, extra, cap, high, low, fine)
        if missed.any():
            extras[missed] = _bounded_extras(load[missed], extra, cap)
        return extras + 1
    narrow_high, narrow_low = _narrowed(load, extra, cap, high, low)
    extras, missed = _window_extras(load, extra, cap, narrow_high, narrow_low, fine)
    if missed.any():  # the narrow window missed the cutoff: the wide one, then the plain bound
        rows = np.flatnonzero(missed)
        wide, missed_wide = _window_extras(
            load[rows], extra, cap, high[rows], low[rows], fine[rows]
        )
        extras[rows] = wide
        if missed_wide.any():
            rows = rows[missed_wide]
            extras[rows] = _bounded_extras(load[rows], extra, cap)
    return extras + 1


def _window(load: np.ndarray, extra: int, cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The window ``[T' / (M' + E'), T' / M']`` that holds the cutoff priority of every row
    (see the module docstring and below): its high and low ends float64 [B, 1], and bool [B]:
    rows where it is defined (elsewhere the ends are 1 and the window misses)."""
    num_experts = load.shape[1]
    total = load.sum(1, keepdims=True)
    # Experts at their cap take `cap` extras each; the window is set by the others. An
    # uncapped expert has fewer than load / p priorities above p and at least load / p - 1
    # at or above it, so with T', M', E' the others' load, extras and count the cutoff lies
    # in [T' / (M' + E'), T' / M']. The capped set is refined a few times from the low end.
    high, low = total / extra, total / (extra + num_experts)
    rest, rest_extra = total, np.full_like(total, extra)
    for _ in range(_CAP_ROUNDS):
        capped = load >= (cap + 1) * low
        if not capped.any():
            break
        count = capped.sum(1, keepdims=True)
        rest = total - np.where(capped, load, 0.0).sum(1, keepdims=True)
        rest_extra = extra - cap * count
        high = rest / np.maximum(rest_extra, 1)
        low = rest / np.maximum(rest_extra + num_experts - count, 1)
    fine = (rest[:, 0] > 0) & (rest_extra[:, 0] > 0)
    return np.where(fine[:, None], high, 1.0), np.where(fine[:, None], low, 1.0), fine


def _narrowed(
    load: np.ndarray, extra: int, cap: int, high: np.ndarray, low: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A narrower window than ``[low, high]`` (float64 [B, 1]) around the cutoff priority,
    high and low ends float64 [B, 1]: it may miss (:func:`_window_extras` says where).

    The count of priorities above p, ``f(1 / p)``, grows by about the load of the experts with
    an extra replica per unit of ``1 / p``; one secant step from the window's middle estimates
    the cutoff, and the window keeps ``_NARROW`` standard deviations of the rounding (about
    ``sqrt(E / 12)``) on either side."""
    middle = 2.0 / (1.0 / high + 1.0 / low)  # the middle of the window in 1 / p
    above = np.clip(np.ceil(load / middle) - 1, 0, cap)
    slope = np.where(load >= middle, load, 0.0).sum(1, keepdims=True)
    slope = np.maximum(slope, 1e-300)
    estimate = 1.0 / middle + (extra - above.sum(1, keepdims=True)) / slope
    margin = _NARROW * np.sqrt(load.shape[1] / 12.0) / slope
    return 1.0 / np.maximum(estimate - margin, 1.0 / high), 1.0 / np.minimum(
        estimate + margin, 1.0 / low
    )


def _window_extras(
    load: np.ndarray, extra: int, cap: int, high: np.ndarray, low: np.ndarray, fine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [B, E]: extra replicas per expert (at most ``cap``) from the candidates between
    ``low`` and ``high`` (float64 [B, 1]), and bool [B]: rows where that window does not hold
    the cutoff or ``fine`` (bool [B]) is False (their extras are not valid)."""
    rows, num_experts = load.shape
    # Won for certain: the priorities above the high end (fewer than M in all while an expert
    # is uncapped, so all above the cutoff); the window holds every priority at or above the
    # low end. The factors keep rounding on the safe side (a wider window).
    won = np.clip(np.ceil(load / high * (1 - _ROUNDING)) - 1, 0, cap).astype(np.int64)
    top = np.clip(np.floor(load / low * (1 + _ROUNDING)), 0, cap).astype(np.int64)
    span = np.maximum(top - won, 0).ravel()
    cell = np.repeat(np.arange(rows * num_experts), span)
    index = np.arange(cell.size)
    # Candidate j of cell c is its (won + 1 + j)-th extra replica: j = index - start of c.
    kth = index - np.repeat(np.cumsum(span) - span - won.ravel() - 1, span)
    width = span.reshape(rows, num_experts).sum(1)
    padded = int(width.max(initial=0))
    # Flat index into [B, padded]: a row's candidates from its start (faster than indexing by
    # (row, column)).
    at = index + np.repeat(np.arange(rows) * padded - (np.cumsum(width) - width), width)
    priority = np.full((rows, padded), -1.0)  # -1: below every priority
    priority.reshape(-1)[at] = load.ravel()[cell] / kth

    def tie_order() -> np.ndarray:  # built only where ties at a cutoff need it (rare)
        order = np.zeros(priority.shape, dtype=np.int64)
        order.reshape(-1)[at] = kth * num_experts + cell % num_experts
        return order

    need = extra - won.sum(1)
    missed = ~fine | (need < 1) | ((priority >= low).sum(1) < need)
    extras = won
    if not missed.any():  # the usual case: every row at once, without selecting rows
        chosen = _largest(priority, need, tie_order)
    else:
        ok = np.flatnonzero(~missed)
        chosen = np.zeros(priority.shape, dtype=bool)
        if ok.size:
            chosen[ok] = _largest(priority[ok], need[ok], lambda: tie_order()[ok])
    extras += np.bincount(cell[chosen.reshape(-1)[at]], minlength=rows * num_experts).reshape(
        rows, num_experts
    )
    return extras, missed


def _bounded_extras(load: np.ndarray, extra: int, cap: int) -> np.ndarray:
    """int64 [B, E]: extra replicas per expert (at most ``cap``) from every candidate the
    load-rank bound admits (see the module docstring)."""
    rows, num_experts = load.shape
    contenders = min(extra, num_experts)
    heaviest = descending_order(load)[:, :contenders] + np.arange(rows)[:, None] * num_experts
    top = load.take(heaviest)  # [B, contenders], heaviest first
    # Candidate (i, k): the k-th extra replica of the expert of load rank i, grouped by i.
    per_expert = np.minimum(extra // np.arange(1, contenders + 1), cap)
    rank_of = np.repeat(np.arange(contenders), per_expert)
    starts = np.cumsum(per_expert) - per_expert
    kth = np.arange(rank_of.size) - starts[rank_of] + 1
    # [B, C]; falls with k and with i (``take``: a C-ordered gather, faster than [:, rank_of])
    priority = top.take(rank_of, axis=1) / kth
    chosen = _largest(
        priority, np.full(rows, extra), lambda: kth * rank_of.size + np.arange(rank_of.size)
    )
    # ``compress``: several times faster than a boolean index.
    target = heaviest.take(rank_of, axis=1).compress(chosen.reshape(-1))
    extras = np.bincount(target, minlength=rows * num_experts)
    return extras.reshape(rows, num_experts)


def _largest(
    priority: np.ndarray, wanted: np.ndarray, tie_order: Callable[[], np.ndarray]
) -> np.ndarray:
    """bool [B, W]: the ``wanted[b]`` largest of ``priority`` float64 [B, W] in every row; of
    equal priorities at the cutoff the lowest ``tie_order()`` (int64, [B, W] or [W], asked
    for only where such ties need it) first.

    Exact ties (integer or Zipf loads) go lowest k first, then the heavier expert, so that the
    tied replicas go to as many experts as possible."""
    # The wanted-th largest priority, by an integer sort (see ``descending_order``); a
    # partition where the candidates are many (linear instead of n log n).
    keys = priority.view(np.int64)
    width = keys.shape[1]
    if width > _PARTITION_FROM and (wanted == wanted[0]).all():
        cutoff = np.partition(keys, width - wanted[0], axis=1)[:, width - wanted[0], None]
    else:
        cutoff, alone = _sorted_cutoff(keys, wanted)
        if alone:  # the priorities at or above the cutoff are exactly the wanted ones
            return priority >= cutoff.view(np.float64)
    cutoff = cutoff.view(np.float64)
    chosen = priority > cutoff
    tied = priority == cutoff
    left = wanted[:, None] - chosen.sum(1, keepdims=True)
    if (tied.sum(1, keepdims=True) > left).any():
        order = tie_order()
        tie_key = np.sort(np.where(tied, order, np.iinfo(np.int64).max), axis=1)
        last = np.take_along_axis(tie_key, np.maximum(left - 1, 0), axis=1)
        tied &= (order <= last) & (left > 0)
    return chosen | tied


def _sorted_cutoff(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, bool]:
    """int64 [B, 1]: the ``wanted[b]``-th largest of ``keys`` int64 [B, W] in every row, by a
    sort; and whether no row holds another key equal to its cutoff (its sorted neighbours
    differ). The sorted copy is freed on return, before the caller's comparisons."""
    ordered = np.sort(keys, axis=1)
    row, at = np.arange(keys.shape[0]), keys.shape[1] - wanted
    cutoff = ordered[row, at]
    below = ordered[row, np.maximum(at - 1, 0)]
    above = ordered[row, np.minimum(at + 1, keys.shape[1] - 1)]
    alone = bool(((below < cutoff) | (at == 0)).all()) and bool(
        ((above > cutoff) | (at == keys.shape[1] - 1)).all()
    )
    return cutoff[:, None], alone


def descending_order(values: np.ndarray) -> np.ndarray:
    """int64 [B, N]: column indices of every row of ``values`` (float64 [B, N], >= 0), largest
    first; lowest index first among values equal but for the last log2(N) bits.

    One integer sort: a non-negative float's bit pattern orders like the float, so the low bits
    can carry the column index (numpy's float argsort is several times slower).
    """
    width = values.shape[1]
    bits = max(1, (width - 1).bit_length())
    low = (1 << bits) - 1
    keys = np.arange(width) - (values.view(np.int64) | low)  # negated; index in the low bits
    keys.sort(axis=1)
    return low - (-keys & low)


def ascending_order(values: np.ndarray, classes: np.ndarray | None = None) -> np.ndarray:
    """int64 [B, N]: column indices of every row of ``values`` (float64 [B, N], >= 0, no -0.0),
    smallest first; lowest index first among values equal but for the last log2(N) bits.
    With ``classes`` (int [B, N], 0-3) those sort first: they take the top two bits of the
    value's pattern (bit 63 is 0 for a non-negative float), so values then count as equal but
    for their last 2 + log2(N) bits."""
    width = values.shape[1]
    low = (1 << max(1, (width - 1).bit_length())) - 1
    keys = values.view(np.int64)
    if classes is not None:
        keys = (keys >> 2) | (classes.astype(np.int64) << 61)
    keys = (keys & ~low) | np.arange(width)
    keys.sort(axis=1)
    return keys & low
