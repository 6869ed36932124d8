"""The repair's column-wise slot sums (eplb/repair_swaps.py) against numpy's own sum over the
last axis, bit for bit: every S up to 20 and past numpy's pairwise block, several layouts,
magnitudes far apart (where the order of the adds shows)."""

from __future__ import annotations

import numpy as np
import pytest

from elastic_ep.eplb.repair_swaps import slot_sum


@pytest.mark.parametrize("per_rank", [*range(1, 21), 64, 129, 200])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (58, 32)])
def test_slot_sum_is_numpys_sum(per_rank: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(per_rank * 100 + len(shape))
    size = (*shape, per_rank)
    values = rng.standard_normal(size) * np.exp(rng.uniform(-30, 30, size))
    assert np.array_equal(slot_sum(values), values.sum(-1))
    transposed = np.ascontiguousarray(np.swapaxes(values, 0, -1)).swapaxes(0, -1)
    assert np.array_equal(slot_sum(transposed), transposed.sum(-1))
