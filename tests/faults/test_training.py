"""Interrupted training (#14 item 5, #15 item 4): a resumed run equals the uninterrupted one bit for bit (the final
adapter tensors and both loss histories), with reports, validations and saves on the global step schedule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from faults.harness import tensors
from smoa_mlx.train import runner
from smoa_mlx.train.checkpoint import load_state
from smoa_mlx.train.loop import Recorder

ITERS = 10


def opts(world, folder, schedule=(1, 4, 4), **kw):
    spr, spe, save = schedule
    base = dict(model=world.model, data=world.data, adapter_path=str(folder), iters=ITERS, batch_size=4,
                steps_per_report=spr, steps_per_eval=spe, save_every=save, val_batches=2, learning_rate=5e-3,
                warmup=2, dropout=0.1, seed=3, rank=4)
    base.update(kw)
    return base


def signal_at(monkeypatch, step: int) -> None:
    """A KeyboardInterrupt right after step ``step`` is reported."""
    report = Recorder.on_train_loss_report

    def report_then_signal(self, info):
        report(self, info)
        if info["iteration"] + self.offset == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "on_train_loss_report", report_then_signal)


def same_run(a: dict, b: dict, folder_a: Path, folder_b: Path) -> None:
    assert a["train_losses"] == b["train_losses"]
    assert a["val_losses"] == b["val_losses"]
    ta, tb = tensors(folder_a / "adapters.safetensors"), tensors(folder_b / "adapters.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].tobytes() == tb[k].tobytes(), k


@pytest.mark.parametrize("schedule,cut", [((5, 8, 3), 7), ((3, 4, 4), 4), ((4, 3, 7), 9)])
def test_resume_equals_uninterrupted_bit_for_bit(world, tmp_path, monkeypatch, capsys, schedule, cut):
    """#14.5: reports, validations and saves stay on the global step schedule across a resume (and #15.4: the
    resumed run validates only on that schedule, a finished run once at the end)."""
    spr, spe, save = schedule
    full = runner.run(opts(world, tmp_path / "full", schedule))
    want_val = sorted({0, ITERS} | set(range(spe, ITERS, spe)))
    assert [s for s, _ in full["val_losses"]] == want_val
    assert [s for s, _ in full["train_losses"]] == sorted({ITERS} | set(range(spr, ITERS + 1, spr)))

    signal_at(monkeypatch, cut)
    with pytest.raises(KeyboardInterrupt):
        runner.run(opts(world, tmp_path / "cut", schedule))
    monkeypatch.undo()
    assert load_state(tmp_path / "cut")[0].step == cut
    capsys.readouterr()
    resumed = runner.run(opts(world, tmp_path / "cut", schedule, resume=True))
    printed = [int(m) for m in re.findall(r"^step\s+(\d+)\s+val loss", capsys.readouterr().out, re.M)]
    # No validation at the resume step (unless the interruption came between that step and its validation),
    # one at the end.
    assert printed == [s for s in want_val if s > cut or (s == cut and cut % spe == 0)]
    assert resumed["start_step"] == cut
    same_run(full, resumed, tmp_path / "full", tmp_path / "cut")
