"""A folder replaced whole (``fuse --force`` over an earlier fused model) survives a SIGKILL at any point.

The real ``python -m smoa_mlx.fuse`` is killed (``inject.py``) before or after the atomic swap of the two folders,
and, on a file system without one (``FAULT_NO_EXCHANGE``), before or after the second of the two renames that
replace it there. Afterwards the folder must load, in smoa-mlx and in stock mlx-lm, with the old or the new
model whole; where the writer died between the two renames the old one is put back by the first reader, with a
warning naming it; and the next write into the parent leaves no temporary folder behind.
"""

from __future__ import annotations

import shutil
import signal

import mlx_lm
import pytest
from tiny_llm import make_model_folder, make_smoa_adapter

from faults.harness import LOCK_NAME, cli
from smoa_mlx import fuse
from smoa_mlx.atomic import remove_stale
from smoa_mlx.loading import load_model


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_NAME}


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """A tiny model, two adapters, and the folder each fuses to: the old and the new content of a replacement."""
    root = tmp_path_factory.mktemp("replace")
    model = make_model_folder(root / "model", seed=3)
    adapters = [make_smoa_adapter(model, root / f"adapter{i}", seed=i) for i in (1, 2)]
    for i, adapter in enumerate(adapters):
        assert fuse.main(["--model", str(model), "--adapter-path", str(adapter), "--save-path", str(root / f"f{i}")]) == 0
    old, new = _snapshot(root / "f0"), _snapshot(root / "f1")
    assert old["model.safetensors"] != new["model.safetensors"]
    return model, adapters[1], root / "f0", old, new


# (atomic swap available, kill at rename N, when, what the folder then holds, put back by the first reader)
CASES = {
    "before the swap": (True, 1, "before", "old", False),
    "after the swap": (True, 1, "after", "new", False),
    "between the two renames": (False, 2, "before", "old", True),
    "after the two renames": (False, 2, "after", "new", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_while_replacing_a_folder_leaves_the_old_or_the_new(fused, tmp_path, case):
    model, adapter, first, old, new = fused
    exchange, kill_at, when, expected, put_back = CASES[case]
    out = tmp_path / "out"
    shutil.copytree(first, out)
    fault = {"FAULT_KILL_AT": str(kill_at), "FAULT_KILL_WHEN": when}
    if not exchange:
        fault["FAULT_NO_EXCHANGE"] = "1"
    p = cli("smoa_mlx.fuse", "--model", model, "--adapter-path", adapter, "--save-path", out, "--force", **fault)
    assert p.rc == -signal.SIGKILL, p.describe()
    assert out.exists() != put_back  # only a writer killed between the two renames leaves no folder there

    if put_back:
        with pytest.warns(RuntimeWarning, match=rf"{out} was missing: a replacement of it was killed"):
            load_model(str(out))
    else:
        load_model(str(out))
    mlx_lm.load(str(out))  # stock mlx-lm reads it as it is
    assert _snapshot(out) == (old if expected == "old" else new)

    remove_stale(tmp_path)  # what every next write into the folder does first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_next_writer_puts_the_old_folder_back_then_replaces_it(fused, tmp_path):
    """Killed between the two renames, then the same command again: it recovers, says so, and finishes."""
    model, adapter, first, old, new = fused
    out = tmp_path / "out"
    shutil.copytree(first, out)
    argv = ["--model", model, "--adapter-path", adapter, "--save-path", out, "--force"]
    p = cli("smoa_mlx.fuse", *argv, FAULT_KILL_AT="2", FAULT_KILL_WHEN="before", FAULT_NO_EXCHANGE="1")
    assert p.rc == -signal.SIGKILL and not out.exists()
    p = cli("smoa_mlx.fuse", *argv)
    assert p.rc == 0, p.describe()
    assert f"{out} was missing: a replacement of it was killed between its two renames" in p.err
    assert _snapshot(out) == new
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
