"""A folder replaced whole (``fuse --force`` over an earlier fused model or ``--hf-path`` export) survives a
SIGKILL at any point.

The real ``python -m smoa_mlx.fuse`` is killed (``inject.py``) before or after the atomic swap of the two folders,
and, on a file system without one (``FAULT_NO_EXCHANGE``), before or after the second of the two renames that
replace it there (``trials._sigkill_replacing`` checks what must hold afterwards).
"""

import random

import pytest

from faults import trials


@pytest.mark.parametrize("case", sorted(trials.REPLACE_CASES))
def test_sigkill_while_replacing_a_folder_leaves_the_old_or_the_new(world, case):
    outcome = trials.sigkill_replacing_folder(world, random.Random(0), case=case, then="reader")
    assert not outcome.failures, (outcome.note, outcome.failures)


def test_the_next_writer_puts_the_old_folder_back_then_replaces_it(world):
    outcome = trials.sigkill_replacing_folder(world, random.Random(0), case="between the two renames", then="writer")
    assert not outcome.failures, (outcome.note, outcome.failures)


@pytest.mark.parametrize("case", ["after the swap", "between the two renames"])
def test_sigkill_while_replacing_an_hf_export_never_mixes_the_two(world, case):
    outcome = trials.sigkill_replacing_hf_export(world, random.Random(0), case=case, then="reader")
    assert not outcome.failures, (outcome.note, outcome.failures)
