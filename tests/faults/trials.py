"""The fault trials: each is one thing a crashing laptop or a hostile user does, and the promise it must keep.

A trial is ``fn(world, rng) -> Outcome``; ``failures`` are broken promises (bad input accepted, a raw traceback, a
folder that no longer loads, a resumed run that differs from the uninterrupted one). ``TRIALS`` lists every kind
with how often the long suite (``scripts/fault_suite.py``) repeats it; ``tests/faults/test_faults.py`` runs a
fast subset of the same functions under pytest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import corrupt
from .harness import (
    LOCK_NAME,
    SCHEDULES,
    SIGNAL_EXIT,
    TRAIN,
    World,
    cli,
    env,
    equal_to_reference,
    finish,
    leftovers,
    loads_or_empty,
    send,
    snapshot,
    spawn,
    tensors,
    train_args,
    wait_for,
)

TRAIN_CLI = "smoa_mlx.train"


@dataclass
class Outcome:
    failures: list[str] = field(default_factory=list)
    note: str = ""
    skipped: bool = False

    def fail(self, *problems: str) -> "Outcome":
        self.failures.extend(p for p in problems if p)
        return self


# -- shared checks ------------------------------------------------------------------------------------------
def clean_error(proc, *names: str, rc: int = 2) -> list[str]:
    """A refused command: exit ``rc``, no traceback, the last stderr line is an error naming each of ``names``."""
    problems = []
    if "Traceback (most recent call last)" in proc.err:
        kind = proc.err.strip().splitlines()[-1][:200]
        problems.append(f"raw traceback ({kind})")
    elif proc.rc != rc:
        problems.append(f"exit {proc.rc}, expected {rc} ({proc.tail[:200]!r})")
    else:
        at = proc.err.rfind("error:")
        line = proc.err[at:].strip() if at >= 0 else proc.tail
        if "error" not in line.lower():
            problems.append(f"last stderr line is not an error: {line[:200]!r}")
        missing = [n for n in names if n not in line]
        if missing:
            problems.append(f"error does not name {missing}: {line[:300]!r}")
    return problems


def finish_run(world: World, folder: Path, schedule) -> list[str]:
    """Complete an interrupted run as a user would (``--resume`` when a checkpoint exists, else start over) and
    compare it with the uninterrupted run."""
    if (folder / "training_state.safetensors").exists():
        p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True))
    else:
        force = (folder / "adapter_config.json").exists() or (folder / "adapters.safetensors").exists()
        p = cli(TRAIN_CLI, *train_args(world, folder, schedule, force=force or None))
    if p.rc != 0:
        return [f"the run could not be completed afterwards: {p.describe()}"]
    problems = equal_to_reference(world, folder, schedule)
    left = leftovers(folder)
    if left:
        problems.append(f"#14.7 temporary files left after a completed run: {left[:4]}")
    return problems


# -- crashes during training ---------------------------------------------------------------------------------
def printed_steps(schedule) -> list[int]:
    """Steps after which the run prints a line (a train report or a validation), before the last step."""
    spr, spe, _ = schedule
    iters = TRAIN["iters"]
    return sorted(set(range(spr, iters, spr)) | set(range(spe, iters, spe)))


def _kill_during_training(world: World, rng: random.Random, signum: int) -> Outcome:
    schedule = rng.choice(SCHEDULES)
    folder = world.folder(f"sig{signum}")
    proc = spawn(TRAIN_CLI, *train_args(world, folder, schedule))
    if signum == signal.SIGKILL and rng.random() < 0.3:  # any moment, Python's own startup included
        time.sleep(rng.uniform(0.0, 6.0))
        where = "a random moment"
    elif rng.random() < 0.25:  # any moment once the command runs (model loading, spectral step, training)
        wait_for(proc, r"^Loading model")
        time.sleep(rng.uniform(0.0, 3.0))
        where = "a random moment after start"
    else:  # just after a random step's report
        step = rng.choice(printed_steps(schedule))
        line = wait_for(proc, rf"^step\s+{step}\s")
        time.sleep(rng.uniform(0.0, 0.05))
        where = f"step {step}" + ("" if line else " (never reached)")
    send(proc, signum)
    p = finish(proc)
    out = Outcome(note=f"{signal.Signals(signum).name} at {where}, schedule {schedule}")
    if signum != signal.SIGKILL:
        if "Traceback (most recent call last)" in p.err:
            out.fail(f"raw traceback after {signal.Signals(signum).name}: {p.tail[:200]}")
        if p.rc not in (0, SIGNAL_EXIT[signum], -signum):
            out.fail(f"#14.8 exit {p.rc} after {signal.Signals(signum).name}, expected {SIGNAL_EXIT[signum]}")
        trained = any(l.startswith("step") and "train loss" in l for l in p.out.splitlines())
        if p.rc == SIGNAL_EXIT[signum] and trained and not (folder / "training_state.safetensors").exists():
            out.fail(f"#14.8 interrupted by {signal.Signals(signum).name} while training, but nothing was saved")
    out.fail(*loads_or_empty(world, folder))
    out.fail(*finish_run(world, folder, schedule))
    return out


def sigkill_random(world, rng, i=0):
    return _kill_during_training(world, rng, signal.SIGKILL)


def sigint_random(world, rng, i=0):
    return _kill_during_training(world, rng, signal.SIGINT)


def sigterm_random(world, rng, i=0):
    return _kill_during_training(world, rng, signal.SIGTERM)


def sighup_random(world, rng, i=0):
    return _kill_during_training(world, rng, signal.SIGHUP)


_RENAMES: dict[tuple, list[str]] = {}


def renames(world: World, schedule, resume_from: Optional[Path] = None) -> list[str]:
    """The targets of every rename an uninterrupted run makes (counted once per schedule)."""
    key = (schedule, resume_from is not None)
    if key not in _RENAMES:
        folder = world.folder("count")
        count = folder.with_suffix(".renames")
        count.unlink(missing_ok=True)
        extra = {}
        if resume_from is not None:
            shutil.copytree(resume_from, folder)
            extra["resume"] = True
        p = cli(TRAIN_CLI, *train_args(world, folder, schedule, **extra), FAULT_COUNT=str(count))
        if p.rc != 0:
            raise RuntimeError(f"counting run failed: {p.describe()}")
        _RENAMES[key] = [line.split("\t")[2].strip() for line in count.read_text().splitlines()]
    return _RENAMES[key]


def _checkpoint_at(world: World, schedule, step: int) -> Path:
    """A folder holding the run stopped (Ctrl-C) just after ``step`` (or the next step it prints a line for): a
    resumable checkpoint, its numbered weights and the adapter."""
    step = min([s for s in printed_steps(schedule) if s >= step] or printed_steps(schedule)[-1:])
    folder = world.root / "checkpoints" / f"{'_'.join(map(str, schedule))}_{step}"
    if not (folder / "training_state.safetensors").exists():
        shutil.rmtree(folder, ignore_errors=True)
        proc = spawn(TRAIN_CLI, *train_args(world, folder, schedule))
        wait_for(proc, rf"^step\s+{step}\s")
        send(proc, signal.SIGINT)
        p = finish(proc)
        if p.rc != 130 or not (folder / "training_state.safetensors").exists():
            raise RuntimeError(f"could not make a checkpoint at step {step}: {p.describe()}")
    return folder


def state_weights(folder: Path) -> str:
    """The numbered weight file a folder's training state names."""
    return corrupt.decode((folder / "training_state.safetensors").read_bytes())[1]["weights"]


def sigkill_at_save(world, rng, i=0):
    """SIGKILL at the commit point of a random file write (before, during or after the rename)."""
    schedule = rng.choice(SCHEDULES)
    resume = rng.random() < 0.4
    start = _checkpoint_at(world, schedule, 5) if resume else None
    targets = renames(world, schedule, start)
    n = rng.randrange(1, len(targets) + 1)
    when = rng.choice(["before", "partial", "after"])
    folder = world.folder("save_kill")
    before = None
    if start is not None:
        shutil.copytree(start, folder)
        before = tensors(folder / "adapters.safetensors")
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=resume or None),
            FAULT_KILL_AT=str(n), FAULT_KILL_WHEN=when)
    out = Outcome(note=f"kill {when} rename {n}/{len(targets)} ({Path(targets[n - 1]).name}), "
                       f"{'resumed' if resume else 'fresh'} run, schedule {schedule}")
    if p.rc != -signal.SIGKILL:
        return out.fail(f"the injected kill did not happen ({p.describe()})")
    out.fail(*loads_or_empty(world, folder, before))
    out.fail(*finish_run(world, folder, schedule))
    return out


# -- corrupt and invalid adapter files -----------------------------------------------------------------------
CONSUMERS = ("api", "fuse", "generate", "chat", "to-hira")


def _broken_adapter(world: World, rng: random.Random, file: str, form: str) -> Path:
    folder = world.folder("broken")
    shutil.copytree(world.adapter(), folder)
    for extra in folder.iterdir():  # the adapter alone, as a user would hand it over
        if extra.name not in (corrupt.WEIGHTS, corrupt.CONFIG):
            extra.unlink()
    forms = corrupt.WEIGHT_FORMS if file == corrupt.WEIGHTS else corrupt.CONFIG_FORMS
    raw = (folder / file).read_bytes()
    (folder / file).write_bytes(forms[form](raw, rng))
    return folder


def api_refuses(world: World, adapter: Path, file: str) -> list[str]:
    """The Python API: one named error (a ValueError / FileNotFoundError subclass) whose message names the file."""
    code = (
        "import sys\n"
        "from smoa_mlx.loading import load_model_with_adapter\n"
        "try:\n"
        f"    load_model_with_adapter({world.model!r}, {str(adapter)!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__module__ + '.' + type(e).__name__, [c.__name__ for c in type(e).__mro__])\n"
        "    print(str(e).replace('\\n', ' ')[:2000])\n"
        "    sys.exit(3)\n"
    )
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=env())
    except subprocess.TimeoutExpired:
        return ["api: no answer within 120 s (hangs)"]
    if p.returncode == 0:
        return ["api: the bad adapter loaded without an error"]
    if p.returncode != 3:
        return [f"api: crashed ({p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else p.returncode})"]
    kind, message = (p.stdout.splitlines() + ["", ""])[:2]
    problems = []
    if "SMoAError" not in kind:
        problems.append(f"api: {kind.split()[0]} is not one of smoa_mlx's named errors")
    if file not in message:
        problems.append(f"api: the error does not name {file}: {message[:200]!r}")
    return problems


def consumer_refuses(world: World, adapter: Path, consumer: str, file: str) -> list[str]:
    if consumer == "api":
        return api_refuses(world, adapter, file)
    out = adapter.parent / f"{adapter.name}_{consumer}_out"
    if consumer == "fuse":
        p = cli("smoa_mlx.fuse", "--model", world.model, "--adapter-path", adapter, "--save-path", out, timeout=120)
    elif consumer == "generate":
        p = cli("smoa_mlx.generate", "--model", world.model, "--adapter-path", adapter, "--prompt", "the cat",
                "--max-tokens", 2, timeout=120)
    elif consumer == "chat":
        p = cli("smoa_mlx.chat", "--model", world.model, "--adapter-path", adapter, "--max-tokens", 2,
                stdin="the cat\n", timeout=120)
    else:
        p = cli("smoa_mlx.convert", "to-hira", adapter, out, "--base", world.model, timeout=120)
    problems = [f"{consumer}: {x}" for x in clean_error(p, file)]
    if out.exists():
        problems.append(f"{consumer}: wrote {out.name} from a bad adapter")
    return problems


def _file_trial(file: str, forms: dict) -> Callable:
    def trial(world, rng, i=0, form: Optional[str] = None, consumer: Optional[str] = None):
        """Repetition ``i`` takes form ``i % len(forms)`` and the next consumer each round of forms."""
        form = form or sorted(forms)[i % len(forms)]
        consumer = consumer or CONSUMERS[(i // len(forms)) % len(CONSUMERS)]
        adapter = _broken_adapter(world, rng, file, form)
        out = Outcome(note=f"{file}: {form} -> {consumer}")
        try:
            return out.fail(*consumer_refuses(world, adapter, consumer, file))
        except subprocess.TimeoutExpired:
            return out.fail(f"{consumer}: no answer within 120 s (hangs)")

    return trial


corrupt_weights = _file_trial(corrupt.WEIGHTS, corrupt.WEIGHT_FORMS)
invalid_config = _file_trial(corrupt.CONFIG, corrupt.CONFIG_FORMS)


def corrupt_checkpoint(world, rng, i=0):
    """--resume over a broken training state or numbered checkpoint: a named error, the folder untouched."""
    schedule = SCHEDULES[0]
    folder = world.folder("bad_state")
    shutil.copytree(_checkpoint_at(world, schedule, 5), folder)
    target = rng.choice(["training_state.safetensors", state_weights(folder)])
    form = rng.choice(["empty", "truncated", "random bytes", "huge header length", "offsets past EOF"])
    raw = (folder / target).read_bytes()
    (folder / target).write_bytes(corrupt.WEIGHT_FORMS[form](raw, rng))
    before = snapshot(folder)
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True))
    out = Outcome(note=f"{target}: {form}")
    out.fail(*clean_error(p, target))
    if snapshot(folder) != before:
        out.fail("the refused --resume changed the folder")
    return out


# -- bad data ---------------------------------------------------------------------------------------------------
DATA_FORMS: dict[str, tuple[list, str, dict]] = {
    # name: (records appended as line 3 of train.jsonl, what the error must name, extra flags)
    "empty text": ([{"text": ""}], "'text'", {}),
    "whitespace text": ([{"text": "   "}], "'text'", {}),
    "null text": ([{"text": None}], "'text'", {}),
    "null content": ([{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}],
                     "content", {}),
    "unknown role": ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
                     "role", {}),
    "no messages": ([{"messages": []}], "'messages'", {}),
    "all-empty chat": ([{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}],
                       "content", {}),
    "all-empty completion": ([{"prompt": "", "completion": ""}], "'completion'", {}),
    "number completion": ([{"prompt": "a", "completion": 5}], "'completion'", {}),
}


def _data_folder(world: World, kind: str, bad: Optional[list]) -> Path:
    from train_helpers import build_data_folder

    folder = world.folder(f"data_{kind}")
    build_data_folder(folder, kind=kind)
    if bad is not None:
        lines = (folder / "train.jsonl").read_text().splitlines()
        lines[2:3] = [json.dumps(r) for r in bad]
        (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def bad_data(world, rng, i=0, form: Optional[str] = None):
    forms = sorted(DATA_FORMS) + ["max-seq-length 1", "not UTF-8", "a JSON list line"]
    form = form or forms[i % len(forms)]
    out = Outcome(note=form)
    adapter = world.folder("bad_data_adapter")
    names = ["train.jsonl", "line 3"]
    flags: dict = {}
    if form in DATA_FORMS:
        records, key, flags = DATA_FORMS[form]
        kind = "chat" if "messages" in records[0] else "completions" if "prompt" in records[0] else "text"
        data = _data_folder(world, kind, records)
        names.append(key)
    elif form == "max-seq-length 1":
        data, names, flags = _data_folder(world, "text", None), ["--max-seq-length"], {"max-seq-length": 1}
    else:
        data = _data_folder(world, "text", None)
        raw = (data / "train.jsonl").read_bytes().split(b"\n")
        raw[2] = b'{"text": "caf\xe9"}' if form == "not UTF-8" else b"[1, 2]"
        (data / "train.jsonl").write_bytes(b"\n".join(raw))
        names = ["train.jsonl"] + (["line 3"] if form != "not UTF-8" else [])
    args = train_args(world, adapter, **flags)
    args[args.index("--data") + 1] = str(data)
    p = cli(TRAIN_CLI, *args)
    out.fail(*clean_error(p, *names))
    if "Loading model" in p.out:
        out.fail("the model was loaded before the data error was found")
    if adapter.exists():
        out.fail("the refused run created its --adapter-path")
    return out


# -- disk full ------------------------------------------------------------------------------------------------
class Tmpfs:
    """A tiny tmpfs (root only), so a write runs out of space for real."""

    def __init__(self, path: Path, size: str = "1m"):
        self.path = path
        self.size = size

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise PermissionError(f"cannot mount a tmpfs: {r.stderr.strip()}")
        return self.path

    def __exit__(self, *exc):
        subprocess.run(["umount", str(self.path)], capture_output=True)
        return False


def _fill(disk: Path, leave: int) -> None:
    """Fill the file system up to ``leave`` free bytes."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def disk_full(world, rng, i=0, what: Optional[str] = None, leave: Optional[int] = None):
    """Out of space while writing: a clear error, nothing partial left, the previous adapter intact."""
    what = what or ["resume", "fuse", "to-hira"][i % 3]
    # Free space from none to a little more than the command needs (the tiny model's files), so both happen:
    # running out in the middle of a write, and fitting.
    leave = rng.randrange(0, {"resume": 160_000, "fuse": 500_000, "to-hira": 40_000}[what]) if leave is None else leave
    out = Outcome(note=f"{what} with {leave} bytes free")
    mount = world.folder("tmpfs")
    try:
        with Tmpfs(mount) as disk:
            schedule = SCHEDULES[0]
            if what == "resume":
                folder = disk / "adapter"
                shutil.copytree(_checkpoint_at(world, schedule, 5), folder)
                (folder / "loss_curve.png").unlink(missing_ok=True)
                before = tensors(folder / "adapters.safetensors")
                _fill(disk, leave)
                p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True))
                if p.rc == 0:
                    out.note += ": it fitted"
                    return out.fail(*equal_to_reference(world, folder, schedule))
                out.note += ": refused, disk full"
                out.fail(*disk_message(p))
                out.fail(*loads_or_empty(world, folder, before))
                state = folder / "training_state.safetensors"
                if not state.exists():
                    out.fail("the training state is gone")
                left = leftovers(folder)
                if left:
                    out.fail(f"partial files left: {left}")
            else:
                adapter = world.adapter()
                target = disk / "out"
                _fill(disk, leave)
                if what == "fuse":
                    p = cli("smoa_mlx.fuse", "--model", world.model, "--adapter-path", adapter, "--save-path", target)
                else:
                    p = cli("smoa_mlx.convert", "to-hira", adapter, target, "--base", world.model)
                if p.rc == 0:
                    out.note += ": it fitted"
                    return out
                out.note += ": refused, disk full"
                out.fail(*disk_message(p))
                left = sorted(x.name for x in disk.iterdir() if x.name != "filler")
                if left:
                    out.fail(f"partial output left: {left}")
    except PermissionError as e:
        out.note += f" (skipped: {e})"
        out.skipped = True
    return out


def disk_message(p) -> list[str]:
    if "Traceback (most recent call last)" in p.err:
        return [f"#14.9 raw traceback on a full disk ({p.tail[:160]})"]
    if "disk full" not in p.tail.lower() and "no space" not in p.tail.lower():
        return [f"#14.9 the error does not say the disk is full: {p.tail[:200]!r}"]
    return []


# -- two runs, one folder -------------------------------------------------------------------------------------
def two_runs_one_folder(world, rng, i=0):
    """A second run into an adapter folder that a live run holds is refused by name; the first finishes intact.

    Either both start at once (whichever comes second is refused: by the lock, or, if the first has already
    finished, because the folder holds an adapter), or the first is frozen (SIGSTOP) in the middle of training
    while the second tries, so the lock must be what refuses it, naming the holder's pid.
    """
    schedule = rng.choice(SCHEDULES)
    folder = world.folder("two_runs")
    together = i % 2 == 0
    first = spawn(TRAIN_CLI, *train_args(world, folder, schedule))
    out = Outcome(note=f"{'started together' if together else 'second run while the first is frozen'}, {schedule}")
    if together:
        second = spawn(TRAIN_CLI, *train_args(world, folder, schedule))
        a, b = finish(first), finish(second)
        ok = [p for p in (a, b) if p.rc == 0]
        if len(ok) != 1:
            return out.fail(f"#14.10 expected one run to finish and one to be refused; exits {a.rc}, {b.rc}")
        refused = b if ok[0] is a else a
        out.fail(*clean_error(refused, str(folder)))
    else:
        wait_for(first, rf"^step\s+{rng.choice(printed_steps(schedule))}\s")
        first.send_signal(signal.SIGSTOP)
        try:
            refused = cli(TRAIN_CLI, *train_args(world, folder, schedule))
        finally:
            first.send_signal(signal.SIGCONT)
        a = finish(first)
        if a.rc != 0:
            out.fail(f"the first run did not finish: {a.describe()}")
        out.fail(*clean_error(refused, str(folder), f"pid {first.pid}"))
        if "in use" not in refused.tail:
            out.fail(f"#14.10 the refusal does not say the folder is in use: {refused.tail[:200]!r}")
    out.fail(*equal_to_reference(world, folder, schedule))
    if (folder / LOCK_NAME).exists():
        out.fail("the lock file stayed after the run finished")
    return out


def stale_lock(world, rng, i=0):
    """A lock left by a dead process (a SIGKILLed run) is taken over."""
    schedule = SCHEDULES[0]
    folder = world.folder("stale_lock")
    folder.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / LOCK_NAME).write_text(f"{dead.pid}\n")
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule))
    out = Outcome(note=f"lock of dead pid {dead.pid}")
    if p.rc != 0:
        return out.fail(f"a stale lock blocked the run: {p.describe()}")
    return out.fail(*equal_to_reference(world, folder, schedule))


# -- a folder replaced whole ------------------------------------------------------------------------------------
# How fuse --force is killed while it replaces its --save-path (or its --hf-path, which it writes first): (atomic
# swap available, kill at rename N, when, what the folder must then hold). Without a swap the folder is replaced by
# two renames.
REPLACE_CASES = {
    "before the swap": (True, 1, "before", "old"),
    "after the swap": (True, 1, "after", "new"),
    "between the two renames": (False, 2, "before", "old"),
    "after the two renames": (False, 2, "after", "new"),
}


def _fused_pair(world: World) -> tuple[Path, Path, Path]:
    """(the adapter to fuse, the folder it fuses to, an earlier fused model of another adapter), made once."""
    root = world.root / "fused_pair"
    folders = [root / "fused_old", root / "fused_new"]
    if not all((f / "config.json").is_file() for f in folders):
        from tiny_llm import make_smoa_adapter

        from smoa_mlx import fuse

        shutil.rmtree(root, ignore_errors=True)
        for seed, folder in enumerate(folders, start=1):
            adapter = make_smoa_adapter(Path(world.model), root / f"adapter{seed}", seed=seed)
            fuse.main(["--model", world.model, "--adapter-path", str(adapter), "--save-path", str(folder)])
    return root / "adapter2", folders[1], folders[0]


def _hf_pair(world: World) -> tuple[Path, Path, Path]:
    """(the adapter to fuse, its --export-hf checkpoint, an earlier checkpoint of another adapter with one shard
    per tensor and an index, so that a mix of the two would show as stale shards), made once."""
    import mlx_lm.utils

    from smoa_mlx import fuse

    adapter, _, _ = _fused_pair(world)
    root = world.root / "hf_pair"
    folders = [root / "hf_old", root / "hf_new"]
    if not all((f / "config.json").is_file() for f in folders):
        shutil.rmtree(root, ignore_errors=True)
        real_shards = mlx_lm.utils.make_shards
        for seed, folder in enumerate(folders, start=1):
            mlx_lm.utils.make_shards = (lambda w: real_shards(w, 0)) if seed == 1 else real_shards
            try:
                fuse.main(["--model", world.model, "--adapter-path", str(adapter.parent / f"adapter{seed}"),
                           "--save-path", str(root / f"mlx{seed}"), "--export-hf", "--hf-path", str(folder)])
            finally:
                mlx_lm.utils.make_shards = real_shards
    return adapter, folders[1], folders[0]


def sigkill_replacing_folder(world, rng, i=0, case: Optional[str] = None, then: Optional[str] = None):
    """SIGKILL while fuse --force replaces an earlier fused model (see :func:`_sigkill_replacing`)."""
    adapter, new_folder, old_folder = _fused_pair(world)
    return _sigkill_replacing(world, rng, case, then, new_folder, old_folder,
                              lambda out: ["--adapter-path", adapter, "--save-path", out])


def sigkill_replacing_hf_export(world, rng, i=0, case: Optional[str] = None, then: Optional[str] = None):
    """SIGKILL while fuse --export-hf --force replaces an earlier --hf-path checkpoint sharded another way: never
    new shards beside the old config, nor an old shard beside the new index (see :func:`_sigkill_replacing`)."""
    adapter, new_folder, old_folder = _hf_pair(world)
    save_path = world.folder("replace_mlx")  # written after the --hf-path, beyond the kill
    return _sigkill_replacing(world, rng, case, then, new_folder, old_folder,
                              lambda out: ["--adapter-path", adapter, "--save-path", save_path, "--export-hf",
                                           "--hf-path", out])


def _sigkill_replacing(world, rng, case, then, new_folder: Path, old_folder: Path, out_args) -> Outcome:
    """A copy of ``old_folder`` replaced by fuse ``--force`` (``out_args(out)``: the adapter and output flags),
    killed at ``case``: the old or the new model loads whole, in smoa-mlx and stock mlx-lm; one killed between two
    renames is put back, with a warning, by the next reader or writer (``then``); no temporary folder stays once the
    next write into the parent has run."""
    import warnings

    import mlx_lm

    from smoa_mlx.atomic import remove_stale
    from smoa_mlx.loading import load_model

    case = case or rng.choice(sorted(REPLACE_CASES))
    then = then or rng.choice(["reader", "writer"])
    exchange, kill_at, when, expected = REPLACE_CASES[case]
    parent = world.folder("replace")
    out = parent / "out"
    shutil.copytree(old_folder, out)
    outcome = Outcome(note=f"{case}, then a {then}")
    fault = {"FAULT_KILL_AT": str(kill_at), "FAULT_KILL_WHEN": when}
    if not exchange:
        fault["FAULT_NO_EXCHANGE"] = "1"
    argv = ["--model", world.model, *out_args(out), "--force"]
    p = cli("smoa_mlx.fuse", *argv, **fault)
    if p.rc != -signal.SIGKILL:
        return outcome.fail(f"the armed fuse was not killed: {p.describe()}")
    missing = not out.exists()
    if missing != (case == "between the two renames"):
        outcome.fail(f"{out} {'is missing' if missing else 'is there'} after a kill {case}")
    said = f"{out} was missing: a replacement of it was killed between its two renames"
    if then == "reader":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                load_model(str(out))
                mlx_lm.load(str(out))  # stock mlx-lm, once the folder is back
            except Exception as e:  # noqa: BLE001 - any failure to load is the broken promise
                return outcome.fail(f"the folder does not load after a kill {case}: {e}")
        warned = any(said in str(w.message) for w in caught)
        remove_stale(parent)  # what the next write into the parent does first
    else:
        expected = "new"
        p = cli("smoa_mlx.fuse", *argv)
        if p.rc != 0:
            return outcome.fail(f"the next fuse failed: {p.describe()}")
        warned = said in p.err
    if warned != missing:
        outcome.fail(f"{'no' if missing else 'a'} warning about putting the folder back ({case}, then a {then})")
    want = snapshot(new_folder if expected == "new" else old_folder)
    if {k: v for k, v in snapshot(out).items() if k != LOCK_NAME} != want:
        outcome.fail(f"{out} does not hold the {expected} model whole after a kill {case}, then a {then}")
    stray = sorted(p.name for p in parent.iterdir() if p.name != "out")
    if stray:
        outcome.fail(f"temporary folders left beside {out}: {', '.join(stray)}")
    return outcome


# -- paths that leave their folder ------------------------------------------------------------------------------
def state_points_outside(world, rng, i=0):
    """training_state.safetensors naming a weight file outside the adapter folder: --resume refuses it."""
    schedule = SCHEDULES[0]
    folder = world.folder("outside")
    shutil.copytree(_checkpoint_at(world, schedule, 5), folder)
    outside = folder.parent / f"{folder.name}_elsewhere.safetensors"
    weights = state_weights(folder)
    shutil.copy(folder / weights, outside)
    form = ["relative ..", "absolute", "symlink"][i % 3]
    if form == "symlink":
        (folder / weights).unlink()
        (folder / weights).symlink_to(outside)
    else:
        name = f"../{outside.name}" if form == "relative .." else str(outside)
        arrays, meta = corrupt.decode((folder / "training_state.safetensors").read_bytes())
        meta["weights"] = name
        (folder / "training_state.safetensors").write_bytes(corrupt.encode(arrays, meta))
    before = snapshot(folder)
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True))
    out = Outcome(note=form)
    out.fail(*clean_error(p, "training_state.safetensors"))
    if snapshot(folder) != before:
        out.fail("the refused --resume changed the folder")
    return out


def config_model_relative(world, rng, i=0):
    """#14.2: adapter_config.json's relative "model" must not resolve against the current directory."""
    folder = world.folder("relative_model")
    shutil.copytree(world.adapter(), folder / "adapter")
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    shutil.copytree(world.model, folder / "adapter" / "base")
    config["model"] = "base"
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    elsewhere = folder / "elsewhere"
    from tiny_llm import make_model_folder

    make_model_folder(elsewhere / "base", seed=11)  # another model of the same shapes at ./base
    p = cli("smoa_mlx.generate", "--adapter-path", folder / "adapter", "--prompt", "the cat", "--max-tokens", 2,
            cwd=elsewhere)
    out = Outcome(note="relative model path, run from another folder")
    if p.rc == 0 and str(elsewhere) in p.err:
        out.fail("#14.2 used the model relative to the current directory")
    elif p.rc != 0:
        out.fail(f"#14.2 the adapter's own base (relative to its folder) was not used: {p.tail[:200]!r}")
    return out


# -- resume semantics (#15) -----------------------------------------------------------------------------------
def resume_validation_schedule(world, rng, i=0):
    """#15.4: a resumed run validates on the schedule only; a finished run validates once at the end."""
    schedule = rng.choice(SCHEDULES)
    spr, spe, save = schedule
    ref = world.reference(schedule)
    out = Outcome(note=f"schedule {schedule}")
    val_steps = [s for s, _ in json.loads((ref / "train_result.json").read_text())["val_losses"]]
    iters = TRAIN["iters"]
    want = sorted({0, iters} | set(range(spe, iters, spe)))
    if val_steps != want:
        out.fail(f"#15.4 validations at steps {val_steps}, expected {want}")
    start = rng.randrange(1, iters)
    folder = world.folder("resume_val")
    shutil.copytree(_checkpoint_at(world, schedule, start), folder)
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True))
    if p.rc != 0:
        return out.fail(f"resume failed: {p.describe()}")
    import re

    seen = [int(m.group(1)) for m in re.finditer(r"^step\s+(\d+)\s+val loss", p.out, re.M)]
    saved = json.loads((folder / "train_result.json").read_text())["start_step"]
    expected = [s for s in want if s > saved]
    if seen != expected:
        out.fail(f"#15.4 the run resumed at step {saved} validated at {seen}, expected {expected}")
    return out


def resume_other_iters(world, rng, i=0):
    """#15.5: --resume with another --iters keeps the schedule or refuses; adapter_config.json is not rewritten."""
    schedule = SCHEDULES[0]
    folder = world.folder("resume_iters")
    shutil.copytree(world.reference(schedule), folder)
    before = snapshot(folder)
    iters = rng.choice([TRAIN["iters"] + 4, TRAIN["iters"] * 2, TRAIN["iters"] - 4])
    p = cli(TRAIN_CLI, *train_args(world, folder, schedule, resume=True, iters=iters))
    out = Outcome(note=f"--resume --iters {iters} after {TRAIN['iters']}")
    if p.rc == 0:
        config = json.loads((folder / "adapter_config.json").read_text())
        old = json.loads(before["adapter_config.json"])
        if config["training"]["warmup"] != old["training"]["warmup"]:
            out.fail("#15.5 the schedule was recomputed (warmup changed)")
        return out
    out.fail(*clean_error(p, "--iters"))
    if "--force" not in p.tail:
        out.fail("#15.5 the refusal does not say how to start over (--force)")
    if snapshot(folder) != before:
        out.fail("#15.5 the refused --resume changed the folder")
    return out


# name -> (function, repetitions in the long suite)
TRIALS: dict[str, tuple[Callable, int]] = {
    "sigkill at a random moment": (sigkill_random, 40),
    "sigkill at save time": (sigkill_at_save, 60),
    "SIGINT while training": (sigint_random, 12),
    "SIGTERM while training": (sigterm_random, 12),
    "SIGHUP while training": (sighup_random, 8),
    "corrupt adapters.safetensors": (corrupt_weights, len(CONSUMERS) * len(corrupt.WEIGHT_FORMS)),
    "invalid adapter_config.json": (invalid_config, len(CONSUMERS) * len(corrupt.CONFIG_FORMS)),
    "corrupt checkpoint on --resume": (corrupt_checkpoint, 8),
    "bad data": (bad_data, 2 * (len(DATA_FORMS) + 3)),
    "disk full": (disk_full, 12),
    "two runs into one folder": (two_runs_one_folder, 8),
    "stale lock": (stale_lock, 2),
    "sigkill while replacing a fused folder": (sigkill_replacing_folder, 8),
    "sigkill while replacing an --hf-path export": (sigkill_replacing_hf_export, 8),
    "training state points outside": (state_points_outside, 6),
    "relative base path in adapter_config.json": (config_model_relative, 1),
    "resume validation schedule": (resume_validation_schedule, 5),
    "resume with another --iters": (resume_other_iters, 3),
}
