"""Interrupted and concurrent training (#14 items 5, 6, 8, 10; #15 items 4, 5), in-process where that is faithful.

Signals are real: the test process sends itself SIGINT / SIGHUP in the middle of a run (``os.kill``), and one
SIGTERM goes to a real ``python -m smoa_mlx.train`` subprocess. The resume checks compare a resumed run with the
uninterrupted one bit for bit: the final adapter tensors and both loss histories.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import mlx.core as mx
import pytest

from faults import trials
from faults.harness import LOCK_NAME, tensors
from smoa_mlx.errors import CheckpointError, FolderInUseError, ResumeMismatchError
from smoa_mlx.folder_lock import FolderLock
from smoa_mlx.train import runner
from smoa_mlx.train.checkpoint import STATE_FILE, load_state
from smoa_mlx.train.loop import Recorder
from smoa_mlx.train.signals import Interrupted

ITERS = 10


def opts(world, folder, schedule=(1, 4, 4), **kw):
    spr, spe, save = schedule
    base = dict(model=world.model, data=world.data, adapter_path=str(folder), iters=ITERS, batch_size=4,
                steps_per_report=spr, steps_per_eval=spe, save_every=save, val_batches=2, learning_rate=5e-3,
                warmup=2, dropout=0.1, seed=3, rank=4)
    base.update(kw)
    return base


def signal_at(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Deliver ``signum`` to this process while step ``step`` is being reported (mid-loop, as a user would)."""
    report = Recorder.on_train_loss_report

    def report_then_signal(self, info):
        report(self, info)
        if info["iteration"] + self.offset == step:
            os.kill(os.getpid(), signum)

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
    with pytest.raises(Interrupted) as e:
        runner.run(opts(world, tmp_path / "cut", schedule))
    monkeypatch.undo()
    assert e.value.exit_code == 130 and e.value.saved_step == cut
    assert load_state(tmp_path / "cut")[0].step == cut
    capsys.readouterr()
    resumed = runner.run(opts(world, tmp_path / "cut", schedule, resume=True))
    printed = [int(m) for m in re.findall(r"^step\s+(\d+)\s+val loss", capsys.readouterr().out, re.M)]
    assert printed == [s for s in want_val if s > cut]  # no validation at the resume step, one at the end
    assert resumed["start_step"] == cut
    same_run(full, resumed, tmp_path / "full", tmp_path / "cut")


def test_signal_inside_an_accumulation_window_stops_at_its_end(world, tmp_path, monkeypatch):
    """With --grad-accumulation-steps 2, a signal after step 5 (mid-window: mlx-lm holds a half-summed gradient
    that no checkpoint can carry) stops after step 6, and the resumed run still equals the uninterrupted one."""
    kw = dict(grad_accumulation_steps=2, steps_per_report=2)
    full = runner.run(opts(world, tmp_path / "full", **kw))
    signal_at(monkeypatch, 5)
    with pytest.raises(Interrupted) as e:
        runner.run(opts(world, tmp_path / "cut", **kw))
    monkeypatch.undo()
    assert e.value.saved_step == 6 and load_state(tmp_path / "cut")[0].step == 6
    resumed = runner.run(opts(world, tmp_path / "cut", resume=True, **kw))
    same_run(full, resumed, tmp_path / "full", tmp_path / "cut")


def test_sighup_saves_and_main_exits_129(world, tmp_path, monkeypatch):
    """#14.8: SIGHUP (a closed terminal) saves like Ctrl-C; main() returns 128 + 1."""
    signal_at(monkeypatch, 3, signal.SIGHUP)
    argv = ["--model", world.model, "--data", world.data, "--adapter-path", str(tmp_path), "--iters", "6",
            "--batch-size", "4", "--val-batches", "1", "--save-every", "5", "--rank", "4"]
    assert runner.main(argv) == 129
    assert load_state(tmp_path)[0].step == 3
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # the handlers are put back


def test_sigterm_to_the_cli_saves_and_resumes_exactly(world):
    """#14.8 through the real CLI: SIGTERM after a random step exits 143 with a checkpoint, and --resume then
    finishes exactly as the uninterrupted run did."""
    rng = random.Random(4)
    outcome = trials.sigterm_random(world, rng)
    assert not outcome.failures, (outcome.note, outcome.failures)


def test_second_run_into_a_held_folder_is_refused(world, tmp_path):
    """#14.10: a live holder's lock refuses a second run, naming the folder and the holder's pid; the folder is
    left as it was."""
    folder = tmp_path / "held"
    with FolderLock(folder):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(FolderInUseError, match=rf"--adapter-path {folder} is in use by another run \(pid {os.getpid()}"):
            runner.run(opts(world, folder))
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]
        p = trials.cli(trials.TRAIN_CLI, *trials.train_args(world, folder))
        assert p.rc == 2 and f"pid {os.getpid()}" in p.tail and "Traceback" not in p.err
    assert not folder.exists()  # the lock created the folder and nothing else was put there


def test_stale_lock_is_taken_over(world, tmp_path, capsys):
    folder = tmp_path / "stale"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("999999999\n")  # no such pid; nobody holds the flock either
    runner.run(opts(world, folder, iters=2))
    assert "took over the lock of pid 999999999" in capsys.readouterr().out
    assert not (folder / LOCK_NAME).exists() and (folder / "adapters.safetensors").is_file()


@pytest.mark.parametrize("form", ["relative ..", "absolute", "symlink", "other step"])
def test_resume_reads_only_the_folders_own_files(world, tmp_path, form):
    """#14.6: the training state may not point --resume at a weight file outside its folder."""
    folder = tmp_path / "ad"
    signal_cut = runner.run(opts(world, folder, iters=4, save_every=2))
    assert signal_cut["steps"] == 4
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(folder / "0000004_adapters.safetensors", outside)
    arrays, meta = mx.load(str(folder / STATE_FILE), return_metadata=True)
    if form == "symlink":
        (folder / "0000004_adapters.safetensors").unlink()
        (folder / "0000004_adapters.safetensors").symlink_to(outside)
    else:
        meta["weights"] = {"relative ..": "../elsewhere.safetensors", "absolute": str(outside),
                           "other step": "0000002_adapters.safetensors"}[form]
        mx.save_safetensors(str(folder / STATE_FILE), arrays, metadata=meta)
    with pytest.raises(CheckpointError, match=r"training_state.safetensors .*the checkpoint of step 4 must be "
                                              r"0000004_adapters.safetensors"):
        load_state(folder)
    with pytest.raises(CheckpointError):
        runner.run(opts(world, folder, iters=4, save_every=2, resume=True))


@pytest.mark.parametrize("change", [{"iters": ITERS + 6}, {"learning_rate": 1e-3}, {"seed": 4}])
def test_resume_with_another_schedule_is_refused(world, tmp_path, change):
    """#15.5: --resume --iters N (or another learning rate, seed...) would silently change the run: refused with
    how to start over, and nothing in the folder rewritten."""
    folder = tmp_path / "ad"
    runner.run(opts(world, folder, save_every=5))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    key = next(iter(change))
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ResumeMismatchError, match=rf"{flag}: saved .*start over with --force"):
        runner.run(opts(world, folder, save_every=5, resume=True, **change))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert json.loads(before["adapter_config.json"])["training"]["iters"] == ITERS


class _Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, so no later write of the run happens."""


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_kill_right_after_a_checkpoint_commits_resumes_exactly(world, tmp_path, monkeypatch, which):
    """The training state is the commit point and is written last: a state on disk means its adapter and config
    are too. (Written before the adapter, a kill right after the first state left no adapter_config.json, so
    --resume failed; right after the last state, the final adapter stayed at the previous checkpoint.)"""
    full = runner.run(opts(world, tmp_path / "full"))
    real_replace = os.replace
    commits = []

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        if Path(dst).name == STATE_FILE:
            commits.append(dst)
            if which == "first" or len(commits) == len(range(4, ITERS, 4)) + 1:  # the final save
                raise _Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        runner.run(opts(world, tmp_path / "cut"))
    monkeypatch.undo()
    resumed = runner.run(opts(world, tmp_path / "cut", resume=True))
    same_run(full, resumed, tmp_path / "full", tmp_path / "cut")
