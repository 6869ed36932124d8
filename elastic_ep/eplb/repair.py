"""Movement-aware repair: start from what the ranks already hold and change as little as needed.

Batched over rows (layers, or (layer, node) pairs of a hierarchical plan), on the layout of
:mod:`elastic_ep.eplb.packing`; ``kept`` is the previous placement mapped onto the new ranks.
A row stops once it reaches its target balancedness. With one slot per rank no swap can help:
:mod:`elastic_ep.eplb.single_slot` gives the wanted replica counts with the fewest transfers.

Without routing shares (``most=None``; every replica takes an equal part of its expert's load)
a row gets :func:`~elastic_ep.eplb.incremental.fill_missing` (every replica the wanted counts
ask for) and then :func:`~elastic_ep.eplb.repair_swaps.swap_towards`, a second time with more
partners per heavy rank (R / 4, at most ``WIDE_PARTNERS``) where it is still short.

With shares (``most``: the units an expert may have), a row's balancedness is measured as the
placement gets it: with :func:`~elastic_ep.eplb.shares.solve_shares`'s units, which move load
between replicas of one expert without moving a weight. Each row goes up a ladder of steps and
leaves it at the first that reaches its target:

1. the fewest moves: experts with no replica left, and the empty slots (a joined rank) filled
   with the wanted replicas heaviest first: shares then move load onto them. A full row still
   short that lost at most S experts (a failure), whose placement without them reaches the
   target with shares, tries :func:`~elastic_ep.eplb.lost_homes.home_lost_experts` instead:
   each lost expert over the surplus replica whose rank's shares can make room for it; where
   that reaches the target the row is done with one write per lost expert (26 x 64 experts on
   32 -> 31 x 3 slots, a failure: 7.5% -> 2.2% of the slots moved, the fewest any plan can);
2. swaps of slots, each carrying the load its share gives it, so that the swaps aim at the
   ranks still heavy after the shares, in rounds, the shares solved again after each (in rows
   that placed replicas the diffusion starts from the units the slots carried, a few swaps
   from its optimum, and gets closer to it than from the equal split; a drift row so solved
   stays in this step where step 3 would move fewer weights). Drift rows (nothing placed in
   step 1) take one swap step per round, the fewest swaps, doubled from round
   ``DRIFT_DOUBLE_FROM`` on (a row still short by then needs many: fewer rounds for few more
   swaps); rows that placed replicas double their steps every round and swap up to the target
   less what solving the shares again added after the previous round (at most half the way
   left), so that a scale event or a failure needs few rounds; a row with empty slots
   receives at most ``SCALE_MOVES`` times their number here (step 3 then moves fewer weights
   than more swaps);
3. the rest of the wanted replicas (over surplus ones), then rounds of swaps by the equal
   split aimed at the target less what the shares add to it (the lift), each measured with
   shares solved from the units the slots had before the round, moved with their replicas
   (:func:`~elastic_ep.eplb.unit_balance.followed_units`; as in step 4). Where that fill alone
   reaches the target, the fewest of its optional writes (the heaviest first, as it placed
   them) that reach it too are bisected for (:func:`_fewer_fill`, ``FILL_PROBES`` shares
   solves). Rows with no empty slot whose replica counts keep them below the target
   (:func:`_count_bound`; every layer of a global scale-down or failure) start here: step 1
   cannot raise that bound, and step 3 starts from ``kept`` for them. So do rows with no
   empty slot and ``RECOUNT_FROM`` replicas per expert or more (a drift on many ranks): there
   a replica handed from an expert whose load fell to one whose load rose receives one weight
   where a swap receives two;
4. swaps by the equal split aimed at the target itself (shares only add to it), a second time
   with more partners per heavy rank where the row is still short with shares (the equal split
   alone may still be short: 384 experts on 128 -> 144 x 3, a scale-up, 44 -> 37 ms). With two
   slots per rank only the second: see ``WIDE_FIRST_SLOTS``.

A row leaves step 2 once a round no longer raises its balancedness (swaps that undo each other,
a spent budget), and step 3 likewise after its first ``STEP3_SETTLE`` rounds: the rounds left
would not help it, and each costs one :func:`solve_shares` of the rows still on the ladder
(about linear in their slots) and one :func:`swap_towards` call. After those rounds a step-3
row with no empty slot also leaves where a round raised it by less than ``STEP3_STALL`` of the
way left: rounds that creep cost a solve each, where step 4 finishes the row at once (a row
with joined ranks keeps its rounds: there step 4 moved more weights, 384 experts on 256 -> 288
x 2 slots 10500 -> 10800). In every step a row whose swaps moved nothing keeps its units
without a new solve: they would come out the same. (Sending a row to step 4 as soon as its
equal split reached the goal with the shares still short saved more rounds but lost
balancedness where the next round's lift would have finished it: 256 experts on 128 x 3
slots, a scale-up, 0.0198 below vLLM.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from elastic_ep.eplb.expert_bits import before_codes
from elastic_ep.eplb.incremental import fill_missing
from elastic_ep.eplb.lost_homes import home_lost_experts
from elastic_ep.eplb.packing import expert_counts
from elastic_ep.eplb.repair_swaps import (
    SWAP_PARTNERS,
    received_count,
    received_slots,
    swap_towards,
)
from elastic_ep.eplb.replication import replica_counts
from elastic_ep.eplb.shares import solve_shares
from elastic_ep.eplb.single_slot import repair_single_slot
from elastic_ep.eplb.unit_balance import (
    balance_with_units,
    carried_units,
    equal_split_balance,
    followed_units,
    unit_totals,
)

WIDE_PARTNERS = 64  # partners per heavy rank in the second pass (rows short of their target)
SHARE_ROUNDS = 8  # rounds of swaps (steps 2 and 3), each measured with shares after it
SHARE_STEP_RANKS = 256  # swap steps per round of step 2: one per this many ranks (at least 1)
SWAP_GAP = 0.2  # rows below (1 - SWAP_GAP) x their target skip step 2
SCALE_MOVES = 2  # step 2 of a row with empty slots receives at most this x their number
# Step-2 round from which drift rows double their swap steps (256 x 32 x 9, a drift: 2.0x ->
# 2.6x vLLM, 8.5% -> 8.8% of the slots moved; from round 2, 64 x 256 x 2 moved 14.7% -> 15.5%).
DRIFT_DOUBLE_FROM = 3
STEP3_SETTLE = 1  # step-3 rounds a row keeps even where one does not raise its balancedness
# Least rise of a step-3 round after the settle ones, x the way left to the target (384
# experts on 256 -> 224 x 5, a scale-down: 7 -> 5 solves, 10440 -> 10080 weights received at
# the same balancedness; it changes 6 of the sweep's 764 movement-aware plans).
STEP3_STALL = 0.25
# Replicas per expert from which rows with no empty slot start at step 3 (58 x 64 experts on
# 512 x 3 slots, a drift: 16.0% -> 7.2% of the slots moved; with 6-9 per expert step 2 moves
# fewer).
RECOUNT_FROM = 10
# Step 4 of rows with up to this many slots per rank (two: pairs; on more than 4 x SWAP_PARTNERS
# ranks) starts with the wide partners: a heavy rank has only 2 x M x 2 candidate swaps, the
# lightest 8 ranks rarely hold a pair that lowers the heaviest rank, and the narrow pass spent
# weights on the other heavy ranks first (58 x 256 experts on 256 -> 224 x 2, a scale-down:
# 0.0110 -> 0.0077 under vLLM's balancedness, 21.0% -> 19.6% of the slots moved, 36 -> 32 ms).
# With 3+ slots the narrow pass stays first: there the wide one costs more per step and moved
# balancedness both ways (384 experts on 128 -> 144 x 3, a scale-up: 0.0080 -> 0.0121 under
# vLLM's, 33 -> 46 ms). The repair without shares (:func:`_swap_passes`) keeps the narrow pass
# first at two slots as well: there the wide one moved fewer weights but lost up to 0.0126
# balancedness (the same scale-down: 0.8890 -> 0.8764).
WIDE_FIRST_SLOTS = 2
# Shares solves that bisect for fewer of step 3's writes where its fill alone reaches the target
# (384 x 60 experts on 1024 -> 896 x 9 slots, 8 nodes: 5.6% of the slots moved without, 2.8%
# with one, 1.4% with two; 196, 267 and 291 ms a plan).
FILL_PROBES = 2


def repair(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    counts: np.ndarray | None = None,
    most: int | None = None,
    mean: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``kept`` repaired for ``load``, see the module docstring.

    Args:
        load: float64 [B, E].
        kept: int64 [B, R, S], what the ranks hold now, no expert twice on one rank.
        target: float64 [B], balancedness at which a row stops (with shares where ``most``).
        budget: int64 [B], most weights received per row (experts without any replica are
            placed regardless).
        counts: int64 [B, E], the replica counts wanted if already known (see
            :func:`elastic_ep.eplb.replication.replica_counts`).
        most: the most routing units an expert may have (``Placement.max_units``); ``None``:
            balancedness with the equal split.
        mean: float64 [B], the mean rank load of the layer each row belongs to (a node's
            row of a hierarchical plan), for :func:`solve_shares`; ``None``: the row's own.

    Returns:
        The slots int64 [B, R, S] and, where ``most`` is given, their routing units int64
        [B, R, S] (:func:`solve_shares`'s), else ``None``.
    """
    _, ranks, per_rank = kept.shape
    if counts is None:
        counts = replica_counts(load, ranks * per_rank, ranks)
    orphans = (expert_counts(kept, load.shape[1]) == 0).sum(1)
    spare = np.maximum(budget - orphans, 0)
    if per_rank == 1:  # no swap helps: a swap of single slots only exchanges two ranks' loads
        slots = repair_single_slot(kept, load, counts, spare)
        return slots, None if most is None else (slots >= 0).astype(np.int64)
    if most is None:
        slots = kept.copy()
        fill_missing(slots, load, counts, spare)
        _swap_passes(slots, kept, load, target, budget)
        return slots, None
    return _repair_with_shares(load, kept, target, budget, counts, (most, mean))


def _repair_with_shares(
    load: np.ndarray,
    kept: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
    counts: np.ndarray,
    shares: tuple[int, np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray]:
    """The ladder of the module docstring; arguments and result as in :func:`repair`
    (``shares``: its ``most`` and ``mean``)."""
    rows, ranks, per_rank = kept.shape
    most, mean = shares

    def solve(at: np.ndarray, part: np.ndarray, warm: np.ndarray | None = None) -> np.ndarray:
        """The units of rows ``at`` (slots ``part``), the diffusion from ``warm`` if given."""
        return solve_shares(part, load[at], most, None if mean is None else mean[at], warm)

    slots = kept.copy()
    orphans = (expert_counts(kept, load.shape[1]) == 0).sum(1)
    empty = (kept < 0).reshape(rows, -1).sum(1)
    # Every empty slot (an expert without a replica may take one, or evict a surplus one).
    first = np.minimum(empty, np.maximum(budget - orphans, 0))
    # Rows with no empty slot to fill whose replica counts keep them below the target go to
    # step 3 at once: step 1 cannot raise their bound (an expert placed where it had no
    # replica keeps it, an evicted surplus replica lowers it), and step 3 starts from
    # ``kept`` for them (a scale-down or a failure of a global plan: every layer).
    # So do rows with RECOUNT_FROM replicas per expert or more: there a replica handed to
    # another expert (one weight received) does what a swap (two) does in step 2.
    recount = ranks * per_rank >= RECOUNT_FROM * load.shape[1]
    direct = (first == 0) & ((_count_bound(kept, load) < target) | recount)
    ladder = np.flatnonzero(~direct)
    units = np.zeros_like(kept)
    balance, slot_weight = np.zeros(rows), np.zeros(kept.shape)
    if ladder.size:
        part = slots[ladder]
        fill_missing(part, load[ladder], counts[ladder], np.zeros_like(ladder))  # orphans
        _fill_empty(part, load[ladder], counts[ladder], first[ladder])
        slots[ladder] = part
        units[ladder] = solve(ladder, part)
        balance[ladder], slot_weight[ladder] = balance_with_units(part, load[ladder], units[ladder])
    # A full row that lost at most one rank's worth of experts (a failure) and is still short:
    # where its placement without them reaches the target with shares, homes their pools can
    # take (:mod:`elastic_ep.eplb.lost_homes`); a row that reaches the target so is done.
    few = np.flatnonzero((empty == 0) & (orphans > 0) & (orphans <= per_rank) & (balance < target))
    if few.size:
        start_balance, start = balance_with_units(kept[few], load[few], solve(few, kept[few]))
        hopeful = start_balance >= target[few]
        few, start = few[hopeful], start[hopeful]
    if few.size:
        homed = home_lost_experts(kept[few], load[few], start)
        homed_units = solve(few, homed)
        homed_balance, homed_weight = balance_with_units(homed, load[few], homed_units)
        reached = homed_balance >= target[few]
        done = few[reached]
        slots[done], units[done] = homed[reached], homed_units[reached]
        balance[done], slot_weight[done] = homed_balance[reached], homed_weight[reached]
    filled = slots.copy()

    # Step 2: swaps of the loads shares give (each slot keeps its units as it moves), in
    # rounds, the shares solved again after each.
    # Swaps keep the replica counts: rows that need other counts (their counts cannot reach
    # the target, or they are far below it) go on to step 3 at once.
    before = before_codes(kept.reshape(-1, per_rank), load.shape[1]).reshape(rows, ranks, -1)

    def bits_of(at: np.ndarray) -> np.ndarray:
        return before[at].reshape(at.size * ranks, -1)

    near = balance >= (1.0 - SWAP_GAP) * target
    eligible = near & ~direct & (_count_bound(slots, load) >= target)
    short = np.flatnonzero((balance < target) & eligible)
    share_lift = np.zeros(rows)  # what solving the shares again added to the carried units
    base_steps = max(1, ranks // SHARE_STEP_RANKS)
    placed = (orphans + first) > 0
    # A scale-up's swaps stop at SCALE_MOVES x the joined slots: past that, step 3 (other
    # replica counts from step 1's state) reaches the target with fewer transfers.
    swap_budget = np.where(empty > 0, np.minimum(budget, SCALE_MOVES * empty), budget)
    for step in range(SHARE_ROUNDS):
        if short.size == 0:
            break
        part = slots[short]
        weight = slot_weight[short]  # what the units give, moved with the slots below
        totals = unit_totals(part, load.shape[1], units[short])
        # Rows that placed replicas (orphans, joined ranks) double their steps every round and
        # swap up to the target less what solving the shares again added after the last
        # round (at most half the way); the others (drift) take the base steps to the target,
        # the shares solved after each: the fewest swaps.
        grow = placed[short]
        drift_steps = base_steps << max(0, step - DRIFT_DOUBLE_FROM)
        row_steps = np.where(grow, base_steps << step, drift_steps)
        lifted = np.minimum(share_lift[short], 0.5 * (target[short] - balance[short]))
        swap_towards(
            part,
            kept[short],
            load[short],
            target[short] - np.where(grow, lifted, 0.0),
            swap_budget[short],
            min(base_steps << step, ranks * per_rank),
            slot_weight=weight,
            before=bits_of(short),
            row_steps=row_steps,
        )
        # A row whose swaps moved nothing leaves step 2 as it is: solving its shares again
        # would give the units it has.
        moved = (part != slots[short]).reshape(short.size, -1).any(1)
        short, part, weight, totals = short[moved], part[moved], weight[moved], totals[moved]
        if short.size == 0:
            break
        slots[short] = part
        carried = carried_units(part, load[short], weight, totals)
        carried_balance, carried_weight = balance_with_units(part, load[short], carried)
        # Rows that placed replicas start the diffusion from the units their slots carried,
        # the others from the equal split (all-zero units), see the module docstring.
        start = np.where(placed[short][:, None, None], carried, 0)
        solved = solve(short, part, start)
        solved_balance, solved_weight = balance_with_units(part, load[short], solved)
        better = solved_balance >= carried_balance
        units[short] = np.where(better[:, None, None], solved, carried)
        slot_weight[short] = np.where(better[:, None, None], solved_weight, carried_weight)
        # A row leaves step 2 once a round no longer raises its balancedness (swaps that undo
        # each other, a spent budget): more rounds of the same would not help it.
        rose = np.maximum(solved_balance, carried_balance) > balance[short]
        balance[short] = np.maximum(solved_balance, carried_balance)
        share_lift[short] = np.maximum(solved_balance - carried_balance, 0.0)
        short = short[(balance[short] < target[short]) & rose]
    short = np.flatnonzero(balance < target)

    def measure(at: np.ndarray, warm: np.ndarray | None = None) -> None:
        """The units and balancedness of rows ``at`` with their slots now, the shares solved
        from ``warm`` (:func:`followed_units` of the units before a round's swaps) if given."""
        if at.size == 0:
            return
        units[at] = solve(at, slots[at], warm)
        balance[at] = balance_with_units(slots[at], load[at], units[at])[0]

    # Step 3, rows still short: from step 1 again (from ``kept`` where it had no empty slot to
    # fill: all replicas placed at once leave the swaps a better start), the rest of the wanted
    # replicas, then rounds of swaps by the equal split, each measured with shares.
    if short.size:
        part = np.where((first[short] > 0)[:, None, None], filled[short], kept[short])
        spent = received_count(part, kept[short]) + np.where(first[short] > 0, 0, orphans[short])
        start = part.copy()
        fill_missing(part, load[short], counts[short], np.maximum(budget[short] - spent, 0))
        slots[short] = part
        measure(short)
        _fewer_fill(slots, start, short, (load, counts, kept), (balance, target, units), measure)

    for round3 in range(SHARE_ROUNDS):
        short = short[balance[short] < target[short]]
        if short.size == 0:
            break
        was = balance[short]
        part = slots[short]
        # Swap until the equal split reaches the target less what shares add to it now.
        lift = np.maximum(balance[short] - equal_split_balance(part, load[short]), 0.0)
        goal = target[short] - lift
        swap_towards(
            part,
            kept[short],
            load[short],
            goal,
            budget[short],
            ranks * per_rank,
            before=bits_of(short),
        )
        moved = (part != slots[short]).reshape(short.size, -1).any(1)
        short, was = short[moved], was[moved]
        warm = followed_units(slots[short], part[moved], units[short])
        slots[short] = part[moved]
        measure(short, warm)
        # Likewise after STEP3_SETTLE rounds (a row then swings around its target; a first
        # round may lose what the next gains, and step 4 would move more weights), and, with
        # no empty slot, where the round raised it by less than STEP3_STALL of the way left:
        # rounds that creep cost a solve each where step 4 finishes the row at once (a row
        # with joined ranks keeps them: step 4 would move more weights than the rounds).
        if round3 >= STEP3_SETTLE:
            least = STEP3_STALL * np.maximum(target[short] - balance[short], 0.0)
            short = short[balance[short] - was > np.where(empty[short] > 0, 0.0, least)]
    # Step 4, rows still short: swaps by the equal split to the target (the repair without
    # shares; shares only add to it), then, for rows still short with shares, once more with
    # more partners per heavy rank (as :func:`_swap_passes`, which measures the equal split).
    short = np.flatnonzero(balance < target)
    passes: tuple[int, ...] = (SWAP_PARTNERS, min(ranks // 4, WIDE_PARTNERS))
    if per_rank <= WIDE_FIRST_SLOTS and ranks > 4 * SWAP_PARTNERS:
        passes = passes[1:]
    for partners in passes:
        if short.size == 0:
            break
        part = slots[short]
        swap_towards(
            part,
            kept[short],
            load[short],
            target[short],
            budget[short],
            ranks * per_rank,
            partners=partners,
            before=bits_of(short),
        )
        changed = (part != slots[short]).reshape(short.size, -1).any(1)
        warm = followed_units(slots[short[changed]], part[changed], units[short[changed]])
        slots[short] = part
        measure(short[changed], warm)  # the others keep the units measured for their slots
        if ranks <= 4 * SWAP_PARTNERS:
            break
        short = short[balance[short] < target[short]]
    return slots, units


def _fewer_fill(
    slots: np.ndarray,
    start: np.ndarray,
    rows: np.ndarray,
    problem: tuple[np.ndarray, np.ndarray, np.ndarray],
    levels: tuple[np.ndarray, np.ndarray, np.ndarray],
    measure: Callable[[np.ndarray], None],
) -> None:
    """Rows ``rows`` whose step-3 fill alone reached the target (``slots[rows]``, filled from
    ``start`` int64 [C, R, S]) keep the fewest of its optional writes that reach it as well,
    bisected in ``FILL_PROBES`` measures (in place; ``measure`` sets their balancedness
    again). A fill writes each slot at most once; one write per expert that had no replica is
    needed, and so is every write that receives no weight (undoing it would save none: a
    scale-up's joined slot that step 1 filled and the fill overwrote); the others are kept
    heaviest first (the load per wanted replica of the expert written), as the fill placed
    them. Any such subset is a placement: an expert the fill places is never one it evicts.
    Node rows of a hierarchical scale-down re-counted 24 replicas where 12 did it (384 experts
    on 1024 -> 896 x 2 slots, 8 nodes: 2.3x -> 1.7x the fewest weights).

    Args:
        slots: int64 [B, R, S], all rows. start: the rows' slots before the fill.
        rows: int64 [C]. problem: ``load`` float64 [B, E], the wanted ``counts`` int64 [B, E]
            and ``kept`` int64 [B, R, S]. levels: balancedness and target, float64 [B] each,
            and the routing units int64 [B, R, S] that ``measure`` solves.
    """
    load, counts, kept = problem
    balance, target, units = levels
    done = np.flatnonzero(balance[rows] >= target[rows])
    if done.size == 0:
        return
    at, begin = rows[done], start[done]
    full = slots[at]
    order, needed = _writes_by_worth(begin, full, load[at] / np.maximum(counts[at], 1), kept[at])
    optional = (full != begin).reshape(at.size, -1).sum(1) - needed
    high, low = optional, np.zeros_like(optional)  # budgets that reach / miss (0: not tried)
    best_slots, best_units, best_balance = full.copy(), units[at], balance[at]
    for _ in range(FILL_PROBES):
        probe = np.flatnonzero(high - low >= 2)
        if probe.size == 0:
            return
        rows_at, middle = at[probe], (low[probe] + high[probe]) // 2
        keep = order[probe] < (needed[probe] + middle)[:, None]
        part = np.where(keep.reshape(full[probe].shape), full[probe], begin[probe])
        slots[rows_at] = part
        measure(rows_at)
        reached = balance[rows_at] >= target[rows_at]
        high[probe[reached]], low[probe[~reached]] = middle[reached], middle[~reached]
        better = probe[reached]
        best_slots[better] = part[reached]
        best_units[better] = units[rows_at[reached]]
        best_balance[better] = balance[rows_at[reached]]
        back = probe[~reached]  # to the fewest writes that reached the target
        slots[at[back]] = best_slots[back]
        units[at[back]] = best_units[back]
        balance[at[back]] = best_balance[back]


def _writes_by_worth(
    begin: np.ndarray, full: np.ndarray, per_replica: np.ndarray, kept: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """int64 [C, R * S]: each slot's place among its row's writes (``full`` where it differs
    from ``begin``, both int64 [C, R, S]): first the writes a row needs, one per expert absent
    from ``begin`` (its first slot) and every write that adds no weight received over ``kept``
    (int64 [C, R, S]; undoing it saves none), then the others by ``per_replica`` (float64
    [C, E]) of the expert written, heaviest first (ties in slot order); slots not written come
    last. Also int64 [C]: the writes each row needs."""
    rows, experts = per_replica.shape
    before, after = begin.reshape(rows, -1), full.reshape(rows, -1)
    written = before != after
    row = np.arange(rows)[:, None]
    worth = np.where(written, per_replica[row, np.maximum(after, 0)], -np.inf)
    adds = (received_slots(full, kept) & ~received_slots(begin, kept)).reshape(rows, -1)
    worth[written & ~adds] = np.inf
    # The first slot of every expert absent from ``begin``: the write that re-homes it.
    absent = (expert_counts(begin, experts) == 0).ravel()
    key = (row * experts + np.maximum(after, 0)).ravel()
    candidate = np.flatnonzero(written.ravel() & absent[key])
    _, first = np.unique(key[candidate], return_index=True)
    worth.ravel()[candidate[first]] = np.inf
    order = np.argsort(-worth, axis=1, kind="stable")
    place = np.empty_like(order)
    np.put_along_axis(place, order, np.arange(order.shape[1])[None, :], axis=1)
    return place, np.count_nonzero(worth == np.inf, axis=1)


def _fill_empty(
    slots: np.ndarray, load: np.ndarray, counts: np.ndarray, budget: np.ndarray
) -> None:
    """Fill empty slots of ``slots`` (in place) with the wanted replicas, evicting nothing (no
    expert counts as surplus), at most ``budget`` (int64 [B]) per row: :func:`fill_missing`
    again with what is left while a pass fills a slot (a replica whose expert the rank with
    room already holds leaves that slot to another expert's replica)."""
    rows, experts = slots.shape[0], load.shape[1]
    left = budget.copy()
    while True:
        empty = (slots < 0).reshape(rows, -1).sum(1)
        todo = np.flatnonzero((empty > 0) & (left > 0))
        if todo.size == 0:
            return
        part = slots[todo]
        wanted = np.maximum(counts[todo], expert_counts(part, experts))
        fill_missing(part, load[todo], wanted, np.minimum(empty[todo], left[todo]))
        placed = empty[todo] - (part < 0).reshape(todo.size, -1).sum(1)
        if not placed.any():
            return
        slots[todo] = part
        left[todo] -= placed


def _count_bound(slots: np.ndarray, load: np.ndarray) -> np.ndarray:
    """float64 [B]: the most balancedness any shares reach with the replica counts of ``slots``
    (int64 [B, R, S]) for ``load`` (float64 [B, E]): an expert's ranks together take all its
    load, so the heaviest rank carries at least ``load / replicas`` of every expert."""
    ranks = slots.shape[1]
    per_replica = load / np.maximum(expert_counts(slots, load.shape[1]), 1)
    mean = load.sum(1) / ranks
    peak = np.maximum(per_replica.max(1), mean)
    return np.where(peak > 0, mean / np.maximum(peak, 1e-300), 1.0)


def _swap_passes(
    slots: np.ndarray,
    kept: np.ndarray,
    load: np.ndarray,
    target: np.ndarray,
    budget: np.ndarray,
) -> None:
    """:func:`swap_towards` on ``slots`` in place, then rows still short of their target (by
    the equal split) once more with more partners per heavy rank: the repair without shares."""
    ranks, per_rank = slots.shape[1:]
    swap_towards(slots, kept, load, target, budget, ranks * per_rank)
    if ranks <= 4 * SWAP_PARTNERS:
        return
    short = np.flatnonzero(equal_split_balance(slots, load) < target)
    if short.size == 0:
        return
    part = slots[short]
    swap_towards(
        part,
        kept[short],
        load[short],
        target[short],
        budget[short],
        ranks * per_rank,
        partners=min(ranks // 4, WIDE_PARTNERS),
    )
    slots[short] = part
