"""The share solver's early exits: layers that cannot gain keep the equal split, and ruling them
out leaves the other layers' shares as they are solved alone."""

from __future__ import annotations

import numpy as np

from elastic_ep.eplb.placement import max_units
from elastic_ep.eplb.shares import MIN_UNITS_PER_REPLICA, solve_shares

# Expert 0 (load 6) on ranks 0 and 1, rank 0 also holds expert 1 (load 2): shares move load
# from rank 0 to rank 1 (tests/test_shares.py::test_solver_moves_load_off_the_heaviest_rank).
GAINS = np.array([[0, 1], [0, 2]]), np.array([6.0, 2.0, 0.0])
# The heaviest rank holds experts of one replica each: it cannot fall.
STUCK = np.array([[1, 2], [0, 0]]), np.array([1.0, 6.0, 2.0])
# Balanced: no rank is above the mean.
EVEN = np.array([[0, 1], [0, 2]]), np.array([4.0, 2.0, 2.0])


def _solve(*layers: tuple[np.ndarray, np.ndarray], most: int = 0) -> np.ndarray:
    slots = np.stack([layer[0] for layer in layers])
    load = np.stack([layer[1] for layer in layers])
    return solve_shares(slots, load, most or max_units(4, 3))


def test_layers_that_cannot_gain_keep_the_equal_split() -> None:
    assert (_solve(STUCK) == 1).all()
    assert (_solve(EVEN) == 1).all()
    assert (_solve(STUCK, EVEN) == 1).all()


def test_ruled_out_layers_leave_the_others_as_solved_alone() -> None:
    alone = _solve(GAINS)
    assert (alone > 1).any()
    mixed = _solve(STUCK, GAINS, EVEN)
    assert np.array_equal(mixed[1], alone[0])
    assert (mixed[[0, 2]] == 1).all()


def test_too_few_units_for_two_movable_replicas_solve_nothing() -> None:
    assert (_solve(GAINS, most=2 * MIN_UNITS_PER_REPLICA - 1) == 1).all()
    assert (_solve(GAINS, most=2 * MIN_UNITS_PER_REPLICA) > 1).any()


def test_empty_slots_get_no_units() -> None:
    slots = np.array([[[0, -1], [0, 1]], [[0, 1], [0, 2]]])
    load = np.array([[6.0, 2.0, 0.0], [6.0, 2.0, 0.0]])
    units = solve_shares(slots, load, max_units(4, 3))
    assert units[0, 0, 1] == 0
    assert ((units > 0) == (slots >= 0)).all()
