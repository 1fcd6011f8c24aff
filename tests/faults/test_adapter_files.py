"""#14 items 3 and 4: every corrupt or invalid adapter file is refused with one named error naming the file.

Each form of ``faults/corrupt.py`` (truncated, random bytes, huge header, NaN factors, int32 factors, non-permutation
orders, alpha NaN, a billion blocks, JSON nested 200k deep, a malformed base fingerprint...) goes through the Python
API a user calls; a few go through the commands that used to write a NaN model or crash.
"""

import random
import shutil

import pytest

from faults import corrupt, trials
from smoa_mlx.errors import SMoAError
from smoa_mlx.loading import load_model_with_adapter


def broken(world, tmp_path, file, form):
    folder = tmp_path / "adapter"
    shutil.copytree(world.adapter(), folder)
    forms = corrupt.WEIGHT_FORMS if file == corrupt.WEIGHTS else corrupt.CONFIG_FORMS
    (folder / file).write_bytes(forms[form]((folder / file).read_bytes(), random.Random(0)))
    return folder


FORMS = [(corrupt.WEIGHTS, f) for f in sorted(corrupt.WEIGHT_FORMS)] + \
        [(corrupt.CONFIG, f) for f in sorted(corrupt.CONFIG_FORMS)]


@pytest.mark.parametrize("file,form", FORMS, ids=[f"{f}: {form}" for f, form in FORMS])
def test_api_names_the_file(world, tmp_path, file, form):
    with pytest.raises(SMoAError) as e:
        load_model_with_adapter(world.model, broken(world, tmp_path, file, form))
    assert file in str(e.value), str(e.value)


def test_the_good_adapter_loads(world):
    load_model_with_adapter(world.model, world.adapter())


@pytest.mark.parametrize("form,consumer", [("NaN in B", "fuse"), ("row_order duplicate", "to-hira"),
                                           ("truncated", "generate")])
def test_commands_refuse_without_writing(world, form, consumer):
    """fuse used to write a NaN model and to-hira a wrong PEFT adapter, both with exit 0."""
    outcome = trials.corrupt_weights(world, random.Random(0), form=form, consumer=consumer)
    assert not outcome.failures, outcome.failures
