"""A short seeded subset of benchmarks/fault_sweep.py (4 of its trials), run in CI: on 3 test
hosts, a partition inside a 3 -> 6 scale, a SIGKILL while serving, a SIGSTOP at a 5 -> 3 scale's
commit, a 2 s flap inside a 2 -> 3 scale after which every member survives (the toy engine's
planner once took the scale's members for such a recovery's). Each must end completed, rolled back, recovered or unrecoverable with a clear error,
within its bound, with every serving rank's weights bit for bit."""

from __future__ import annotations

import pytest

from elastic_ep.testing.fault_trial import Outcome, Trial, bound_s, random_trial, run_on_test_hosts
from elastic_ep.testing.netns import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"no test hosts: {unavailable_reason()}"
)

SEEDS = (21, 23, 24, 123)
GOOD = {
    Outcome.COMPLETED.value,
    Outcome.ROLLED_BACK.value,
    Outcome.RECOVERED.value,
    Outcome.UNRECOVERABLE.value,
}


def test_random_trials_are_reproducible() -> None:
    assert random_trial(24) == random_trial(24)
    assert random_trial(24).fault == "sigstop" and random_trial(21).fault == "partition"


@pytest.mark.timeout(400)
def test_seeded_fault_trials_end_well_within_their_bound() -> None:
    trials = [random_trial(s) for s in SEEDS]
    records = list(run_on_test_hosts(trials, hosts=3))
    assert len(records) == len(trials)
    for record in records:
        seed = record["trial"]["seed"]
        assert record["outcome"] in GOOD, (seed, record)
        assert record["settle_s"] <= bound_s(Trial(**record["trial"])), (seed, record)
        if record["outcome"] == Outcome.UNRECOVERABLE.value:
            assert record["detail"], (seed, record)  # the error says why
