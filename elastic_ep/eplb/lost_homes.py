"""Homes for lost experts on ranks whose routing shares can make room: the fewest writes.

A failed rank (or a scale-down) leaves experts with no replica; each needs a slot, and in a
full placement that slot holds a *surplus* replica (its expert keeps another) that it evicts.
With routing shares the choice decides whether those writes are all the plan needs: a rank
that still holds a replicated expert after the eviction passes load to that expert's other
ranks, and the evicted replica's share goes to its own expert's other ranks. The step-1 fill
(:func:`~elastic_ep.eplb.incremental.fill_missing`) ranks slots by the equal split;
:func:`home_lost_experts` scores them by the loads the placement's shares give
(``slot_load``), for lost expert ``e`` of load ``w`` over slot ``s`` of rank ``r`` holding
expert ``x`` of ``c >= 2`` replicas, as the largest of:

* r's load after the write, ``L_r - load(s) + w``, ten times that where r would hold no
  replicated expert (no share of it could move);
* the heaviest other rank of ``x`` plus ``load(s) / (c - 1)``: where the evicted share goes;
* r's fixed load, its single-replica experts and ``w``: what no share moves;

and writes the lowest-scored slot, heaviest lost expert first, the evicted share spread evenly
over ``x``'s other replicas (no shares solve between writes). Each write is a pass over the
rows' slots (a few dozen whole-array numpy calls), so it is meant for one rank's worth of lost
experts: :mod:`elastic_ep.eplb.repair` gives it the full rows still short that lost at most S
experts and whose placement without them already reaches the target with shares, and keeps
its placement where the shares solved for it reach the target too.
"""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.repair_swaps import slot_sum

RIGID = 10.0
"""Factor on the load of a rank left with no replicated expert: its load could not move."""


def home_lost_experts(slots: np.ndarray, load: np.ndarray, slot_load: np.ndarray) -> np.ndarray:
    """int64 [B, R, S]: ``slots`` with every expert that has no replica written over a surplus
    replica, see the module docstring.

    Args:
        slots: int64 [B, R, S], full (no empty slot), no expert twice on one rank; every row
            has a surplus replica per lost expert (R x S >= E).
        load: float64 [B, E], non-negative.
        slot_load: float64 [B, R, S], each slot's load with the placement's routing shares
            (:func:`~elastic_ep.eplb.unit_balance.balance_with_units`); lost experts' load is
            in no slot.
    """
    experts = load.shape[1]
    out = slots.copy()
    weight = slot_load.copy()
    lost = _lost_heaviest_first(expert_counts(slots, experts), load)
    for k in range(lost.shape[1]):
        at = np.flatnonzero(lost[:, k] >= 0)
        if at.size == 0:
            break
        expert = lost[at, k]
        part, part_weight = out[at], weight[at]
        rank, slot = _best_slot(part, part_weight, load[at], expert)
        _write(part, part_weight, (rank, slot), expert, load[at])
        out[at], weight[at] = part, part_weight
    return out


def _lost_heaviest_first(counts: np.ndarray, load: np.ndarray) -> np.ndarray:
    """int64 [B, K] (-1 padded): each row's experts with no replica (``counts`` int64 [B, E]
    of 0), heaviest first by ``load`` float64 [B, E]."""
    lost = counts == 0
    width = int(lost.sum(1).max(initial=0))
    order = np.argsort(np.where(lost, -load, np.inf), axis=1, kind="stable")[:, :width]
    return np.where(np.take_along_axis(lost, order, axis=1), order, -1)


def _best_slot(
    slots: np.ndarray, weight: np.ndarray, load: np.ndarray, expert: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [A] rank and slot of each row's lowest-scored slot for ``expert`` int64 [A]
    (module docstring); ``slots`` int64 [A, R, S] full, ``weight`` float64 [A, R, S] the slot
    loads, ``load`` float64 [A, E]."""
    rows, per_rank = slots.shape[0], slots.shape[2]
    experts = load.shape[1]
    row = np.arange(rows)[:, None, None]
    counts = expert_counts(slots, experts)
    count = counts[row, slots]  # replicas of each slot's expert
    surplus = count >= 2
    holds = (slots == expert[:, None, None]).any(2)
    rank_load = slot_sum(weight)
    fixed = slot_sum(np.where(count == 1, load[row, slots], 0.0))
    w = load[np.arange(rows), expert][:, None, None]
    after = rank_load[:, :, None] - weight + w
    movable_left = (surplus.sum(2)[:, :, None] - surplus) >= 1
    score = np.where(movable_left, after, RIGID * after)
    np.maximum(score, _way_out(slots, rank_load, weight, count, experts), out=score)
    np.maximum(score, fixed[:, :, None] + w, out=score)
    score[~surplus | holds[:, :, None]] = np.inf
    best = np.argmin(score.reshape(rows, -1), axis=1)
    return best // per_rank, best % per_rank


def _way_out(
    slots: np.ndarray,
    rank_load: np.ndarray,
    weight: np.ndarray,
    count: np.ndarray,
    experts: int,
) -> np.ndarray:
    """float64 [A, R, S]: for each slot, the heaviest other rank holding its expert plus the
    slot's load spread over the expert's other replicas (its load once the slot is
    evicted)."""
    rows = slots.shape[0]
    group = (slots + (np.arange(rows) * experts)[:, None, None]).ravel()
    at_rank = np.broadcast_to(rank_load[:, :, None], slots.shape).ravel()
    top = np.zeros(rows * experts)
    np.maximum.at(top, group, at_rank)
    is_top = at_rank == top[group]
    ties = np.bincount(group[is_top], minlength=rows * experts)
    second = np.zeros(rows * experts)
    np.maximum.at(second, group[~is_top], at_rank[~is_top])
    other = np.where(is_top & (ties[group] < 2), second[group], top[group])
    return other.reshape(slots.shape) + weight / np.maximum(count - 1, 1)


def _write(
    slots: np.ndarray,
    weight: np.ndarray,
    at: tuple[np.ndarray, np.ndarray],
    expert: np.ndarray,
    load: np.ndarray,
) -> None:
    """Write ``expert`` int64 [A] into slot ``at`` (rank, slot int64 [A] each) of every row of
    ``slots`` int64 [A, R, S] (in place), its load into ``weight`` float64 [A, R, S], the
    evicted replica's load spread evenly over its expert's other replicas."""
    rows = slots.shape[0]
    row = np.arange(rows)
    rank, slot = at
    evicted = slots[row, rank, slot]
    share = weight[row, rank, slot]
    siblings = slots == evicted[:, None, None]
    siblings[row, rank, slot] = False
    weight += np.where(siblings, (share / siblings.reshape(rows, -1).sum(1))[:, None, None], 0.0)
    slots[row, rank, slot] = expert
    weight[row, rank, slot] = load[row, expert]
