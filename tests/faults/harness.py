"""What every fault trial needs: a tiny real model and data, the real CLI in a subprocess, and the checks.

A :class:`World` lives in one scratch folder: a 2-layer float32 llama (``tests/tiny_llm.py``), a jsonl data
folder, and the uninterrupted reference runs that interrupted ones must equal. Commands run exactly as a user
types them (``python -m smoa_mlx.train ...``) with this checkout first on ``PYTHONPATH``; faults are delivered from
outside (signals) or armed by ``inject.py`` (a SIGKILL at the N-th file rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
INJECT = Path(__file__).with_name("inject.py")

# One small run every trial trains: 12 steps of 4 examples, dropout on (so the RNG restore is exercised).
TRAIN = {"iters": 12, "batch-size": 4, "val-batches": 2, "learning-rate": 5e-3, "warmup": 2, "dropout": 0.1,
         "seed": 3, "rank": 4}
# (steps per report, steps per eval, save every): coprime and equal intervals, a save on the last step or not.
SCHEDULES = [(1, 4, 4), (5, 8, 3), (3, 5, 7), (4, 4, 4), (2, 3, 5)]
TEMP_NAME = re.compile(r"\.tmp|\.old|^\.")  # what an interrupted atomic write may leave behind
LOCK_NAME = ".smoa_mlx.lock"


@dataclass
class Proc:
    """A finished command: exit status and its two streams."""

    rc: int
    out: str
    err: str
    args: list = field(default_factory=list)

    @property
    def tail(self) -> str:
        return (self.err.strip().splitlines() or [""])[-1]

    def describe(self) -> str:
        return f"exit {self.rc}; stderr ends: {self.tail[:300]!r}"


def env(**extra: str) -> dict:
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)] + [p for p in [base.get("PYTHONPATH")] if p])
    base.update(PYTHONUNBUFFERED="1", OPENBLAS_NUM_THREADS=base.get("OPENBLAS_NUM_THREADS", "1"),
                PYTHONIOENCODING="utf-8")
    base.update(extra)
    return base


def command(module: str, args: Sequence[Any], inject: bool = False) -> list[str]:
    head = [sys.executable, str(INJECT), module] if inject else [sys.executable, "-m", module]
    return head + [str(a) for a in args]


def cli(module: str, *args: Any, stdin: str = "", timeout: float = 300, cwd: Optional[Path] = None,
        **extra_env: str) -> Proc:
    """Run ``python -m module args`` to completion."""
    argv = command(module, args, inject=bool(extra_env))
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env=env(**extra_env))
    return Proc(p.returncode, p.stdout, p.stderr, argv)


def spawn(module: str, *args: Any, **extra_env: str) -> subprocess.Popen:
    """Start ``python -m module args``; stdout is line-readable (``wait_for``)."""
    return subprocess.Popen(command(module, args, inject=bool(extra_env)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra_env))


def wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> Optional[str]:
    """Read stdout lines until one matches ``pattern`` (returned) or the process ends (None)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if regex.search(line):
            return line
    return None


def finish(proc: subprocess.Popen, timeout: float = 300) -> Proc:
    out, err = proc.communicate(timeout=timeout)
    return Proc(proc.returncode, out, err, list(proc.args))


def train_args(world: "World", folder: Path, schedule=(1, 4, 4), **kw: Any) -> list[str]:
    spr, spe, save = schedule
    opts = {**TRAIN, "steps-per-report": spr, "steps-per-eval": spe, "save-every": save, **kw}
    args = ["--model", world.model, "--data", world.data, "--adapter-path", folder]
    for key, value in opts.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", value]
    return [str(a) for a in args]


# -- what a folder holds -----------------------------------------------------------------------------------
def tensors(file: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(file)).items()}


def same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> Optional[str]:
    """None when bit-identical (names, dtypes, shapes, bytes), else what differs."""
    if a.keys() != b.keys():
        return f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}"
    for k in sorted(a):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes():
            diff = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max() if a[k].shape == b[k].shape else "shape"
            return f"{k} differs (max abs difference {diff})"
    return None


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder, by name (to prove that a refused command changed nothing)."""
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files an interrupted write left (the lock file of a killed run is not one: it is taken over)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if TEMP_NAME.search(p.name) and p.name != LOCK_NAME)


def history(folder: Path) -> Optional[dict]:
    """Train and validation loss histories from the run's train_result.json."""
    file = folder / "train_result.json"
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    return {"train": result["train_losses"], "val": result["val_losses"]}


class World:
    """A scratch folder with a tiny model, data, and cached reference runs."""

    def __init__(self, root: Path):
        from tiny_llm import make_model_folder
        from train_helpers import build_data_folder

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        model = self.root / "model"
        if not (model / "config.json").is_file():
            make_model_folder(model)
        self.model = str(model)
        data = self.root / "data"
        if not (data / "train.jsonl").is_file():
            build_data_folder(data)
        self.data = str(data)
        self._refs: dict[tuple, Path] = {}
        self._count = 0

    def folder(self, name: str) -> Path:
        """A fresh, empty path for one trial."""
        self._count += 1
        path = self.root / "trials" / f"{self._count:04d}_{name}"
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def reference(self, schedule=(1, 4, 4)) -> Path:
        """The adapter folder of an uninterrupted run with this schedule (trained once per world)."""
        if schedule not in self._refs:
            folder = self.root / "ref" / "_".join(map(str, schedule))
            if not (folder / "train_result.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                p = cli("smoa_mlx.train", *train_args(self, folder, schedule))
                if p.rc != 0:
                    raise RuntimeError(f"the reference run failed: {p.describe()}\n{p.err[-3000:]}")
            self._refs[schedule] = folder
        return self._refs[schedule]

    def adapter(self) -> Path:
        """An SMoA adapter folder with a recorded base fingerprint, to corrupt."""
        folder = self.root / "adapter"
        if not (folder / "adapter_config.json").is_file():
            from tiny_llm import make_smoa_adapter

            make_smoa_adapter(Path(self.model), folder)
        return folder

    def load(self, adapter: Path):
        """Load the adapter through the public API onto a fresh copy of the tiny model (raises what it raises)."""
        from smoa_mlx.loading import load_model_with_adapter

        return load_model_with_adapter(self.model, adapter)


def equal_to_reference(world: World, folder: Path, schedule) -> list[str]:
    """Failures when ``folder``'s finished run differs from the uninterrupted one (tensors bit for bit, histories)."""
    ref = world.reference(schedule)
    problems = []
    if not (folder / "adapters.safetensors").is_file():
        return [f"{folder.name}: no adapters.safetensors after the resumed run"]
    diff = same_tensors(tensors(ref / "adapters.safetensors"), tensors(folder / "adapters.safetensors"))
    if diff:
        problems.append(f"final adapter differs from the uninterrupted run's: {diff}")
    mine, want = history(folder), history(ref)
    if mine is None:
        problems.append("no train_result.json after the resumed run")
    else:
        for key in ("train", "val"):
            if mine[key] != want[key]:
                problems.append(f"{key} loss history differs from the uninterrupted run's: "
                                f"steps {[s for s, _ in mine[key]]} vs {[s for s, _ in want[key]]}"
                                + ("" if [s for s, _ in mine[key]] != [s for s, _ in want[key]] else " (values)"))
    return problems


def loads_or_empty(world: World, folder: Path, previous: Optional[dict] = None) -> list[str]:
    """The promise after any crash: the folder holds a loadable adapter, or (``previous`` None) none at all; with
    ``previous`` (the tensors that were there before), it must load and hold either those or newer ones.

    ``adapter_config.json`` is what makes a folder an adapter (every reader, mlx-lm's included, starts from it, and
    every save renames it into place last): weights without it are an interrupted first save, which every reader
    refuses by name, not an adapter.
    """
    config = folder / "adapter_config.json"
    if not config.exists():
        return [] if previous is None else ["the previous adapter is gone"]
    try:
        world.load(folder)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return [f"the adapter left behind does not load: {type(e).__name__}: {str(e)[:300]}"]
    return []


def send(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
