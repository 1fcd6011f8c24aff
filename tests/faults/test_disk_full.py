"""A full disk (a real 1 MB tmpfs; needs root): a clear error, nothing partial left, the previous adapter intact."""

import random

import pytest

from faults.trials import disk_full


@pytest.mark.parametrize("what", ["resume", "to-hira"])
def test_full_disk(world, what):
    outcome = disk_full(world, random.Random(0), what=what, leave=2000)
    if outcome.skipped:
        pytest.skip(outcome.note)
    assert not outcome.failures, (outcome.note, outcome.failures)
