"""What the trainer adds around ``mlx_lm.tuner.trainer.train`` without forking it.

mlx-lm's ``train`` takes ``iterate_batches`` and ``training_callback`` arguments; they are the hooks used here:

* :class:`BatchStream` wraps mlx-lm's ``iterate_batches``. It gives training its own NumPy RNG (mlx-lm's draws
  from the global one, which evaluation also consumes), so the data order is a function of the seed alone and a
  resumed run can replay it; it skips the steps already done; and it calls ``on_step(step)`` when the batch of the
  next step is fetched, i.e. right after mlx-lm has evaluated step ``step`` (the place to checkpoint).
* :class:`Recorder` keeps the loss history on the global report schedule, totals throughput, and stops on a
  non-finite loss; :func:`with_reporting` hands its reports to mlx-lm's reporting callbacks (``--report-to``).
* :func:`patched_trainer` swaps mlx-lm's rich progress display for a tqdm one that counts global steps, and on
  NCCL reroutes the trainer's ``all_sum(..., stream=mx.cpu)`` calls (NCCL cannot reduce on the CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.tuner import trainer as mlx_trainer
from mlx_lm.tuner.callbacks import TrainingCallback
from tqdm import tqdm

from ..errors import TrainingDiverged


@contextlib.contextmanager
def _numpy_rng(state: list) -> Iterator[None]:
    """Run with ``state[0]`` as NumPy's global RNG state, and store the advanced state back."""
    outer = np.random.get_state()
    np.random.set_state(state[0])
    try:
        yield
    finally:
        state[0] = np.random.get_state()
        np.random.set_state(outer)


class BatchStream:
    """``iterate_batches`` for mlx-lm's ``train``: deterministic, resumable, with a per-step hook."""

    def __init__(self, seed: int, start_step: int = 0, on_step: Optional[Callable[[int], None]] = None):
        self.seed = seed
        self.start_step = start_step
        self.on_step = on_step

    def __call__(self, dataset: Any, batch_size: int, max_seq_length: int, loop: bool = False,
                 seed: Optional[int] = None,
                 comm_group: Optional[mx.distributed.Group] = None) -> Iterator[tuple[mx.array, mx.array]]:
        if loop:
            return self._train(dataset, batch_size, max_seq_length, comm_group)
        return self._fixed(dataset, batch_size, max_seq_length, comm_group)

    def _fixed(self, dataset, batch_size, max_seq_length, comm_group):
        """Evaluation: the same batches every time (comparable validation losses), training RNG untouched."""
        rng = [np.random.RandomState(self.seed + 1).get_state()]
        inner = mlx_trainer.iterate_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=comm_group)
        while True:
            with _numpy_rng(rng):
                batch = next(inner, None)
            if batch is None:
                return
            yield batch

    def _train(self, dataset, batch_size, max_seq_length, comm_group):
        rng = [np.random.RandomState(self.seed).get_state()]
        inner = mlx_trainer.iterate_batches(dataset, batch_size, max_seq_length, loop=True, comm_group=comm_group)
        step = 0
        while True:
            with _numpy_rng(rng):
                batch = next(inner)
            step += 1  # ``batch`` is the batch of global step ``step``
            if step <= self.start_step:
                continue
            if step > self.start_step + 1 and self.on_step is not None:
                self.on_step(step - 1)
            yield batch


class Recorder(TrainingCallback):
    """Loss history in global steps, on the global report schedule; throughput totals; the NaN stop.

    The runner has mlx-lm report after every step, and this class averages those losses over the user's report
    windows (every ``every`` steps, and at step ``last``). A window an interruption cut in two travels in the
    checkpoint (:attr:`state`'s ``pending``), so a resumed run reports the same numbers at the same steps as an
    uninterrupted one; mlx-lm's own windows restart at the resume step and would average other steps.
    """

    def __init__(self, start_step: int = 0, saved: Optional[dict] = None, every: int = 1,
                 last: Optional[int] = None, say: Optional[Callable[[str], None]] = None):
        self.offset = start_step
        self.step = start_step  # the last step whose loss is recorded
        self.every, self.last, self.say = every, last, say
        saved = saved or {}
        self.history = {key: [list(x) for x in saved.get(key, [])] for key in ("train", "val")}
        self.pending = [float(x) for x in saved.get("pending", [])]  # per-step losses of the open window
        self.tokens = 0
        self.windows: list[tuple[int, float]] = []  # (tokens, seconds) per closed report window
        self._window = [0, 0.0]
        self.peak_memory_gb = 0.0
        self.learning_rate = 0.0
        self.reporter: Optional[TrainingCallback] = None  # mlx-lm's --report-to callbacks (with_reporting)

    @property
    def state(self) -> dict:
        """What a checkpoint keeps: the histories and the open window's losses."""
        return {"train": self.history["train"], "val": self.history["val"], "pending": list(self.pending)}

    def on_train_loss_report(self, info: dict) -> None:
        step, loss = info["iteration"] + self.offset, float(info["train_loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss is {loss} at step {step}")
        # mlx-lm reports tokens and tokens/s of the steps since its last report: recover their time.
        tokens = info["trained_tokens"] - self.tokens
        self.tokens = info["trained_tokens"]
        if info["tokens_per_second"] > 0:
            self._window[0] += tokens
            self._window[1] += tokens / info["tokens_per_second"]
        self.peak_memory_gb = max(self.peak_memory_gb, float(info["peak_memory"]))
        self.learning_rate = float(info.get("learning_rate", 0.0))
        self.pending.append(loss)
        self.step = step
        if step % self.every == 0 or step == self.last:
            self._report(step)

    def _report(self, step: int) -> None:
        mean = math.fsum(self.pending) / len(self.pending)
        self.history["train"].append([step, mean])
        steps, self.pending = len(self.pending), []
        tokens, seconds = self._window
        self._window = [0, 0.0]
        if seconds > 0:
            self.windows.append((tokens, seconds))
        speed = tokens / seconds if seconds > 0 else 0.0
        if self.say is not None:
            self.say(f"step {step:>6}  train loss {mean:.4f}  {speed:,.0f} tok/s  {self.tokens / 1000:.1f}k tokens")
        if self.reporter is not None:
            self.reporter.on_train_loss_report({
                "iteration": step, "train_loss": mean, "learning_rate": self.learning_rate,
                "iterations_per_second": steps / seconds if seconds > 0 else 0.0, "tokens_per_second": speed,
                "trained_tokens": self.tokens, "peak_memory": self.peak_memory_gb,
            })

    @property
    def train_time(self) -> float:
        return sum(t for _, t in self.windows) + self._window[1]

    @property
    def tokens_per_second(self) -> float:
        """Steady-state throughput: the first report window, which holds graph compilation, is left out when
        there are others."""
        windows = self.windows[1:] if len(self.windows) > 1 else self.windows
        seconds = sum(t for _, t in windows)
        return sum(n for n, _ in windows) / seconds if seconds > 0 else 0.0

    def on_val_loss_report(self, info: dict) -> None:
        step, loss = info["iteration"] + self.offset, float(info["val_loss"])
        self.record_val(step, loss)

    def record_val(self, step: int, loss: float, seconds: float = 0.0) -> None:
        """A validation loss measured after global step ``step``."""
        if not math.isfinite(loss):
            raise TrainingDiverged(f"validation loss is {loss} at step {step}")
        if not self.history["val"] or self.history["val"][-1][0] != step:
            self.history["val"].append([step, loss])
            if self.reporter is not None:
                self.reporter.on_val_loss_report({"iteration": step, "val_loss": loss, "val_time": seconds})

    def has_val(self, step: int) -> bool:
        return any(s == step for s, _ in self.history["val"])


class TqdmUI:
    """Drop-in for mlx-lm's ``TrainUI`` (same methods): a tqdm bar over global steps, losses above it."""

    def __init__(self, total_iters: int, rank: int = 0, offset: int = 0):
        self.offset = offset
        self.disable = rank != 0
        self.bar = tqdm(total=offset + total_iters, initial=offset, desc="train", unit="step", dynamic_ncols=True,
                        disable=self.disable, file=sys.stderr)

    def __enter__(self) -> TqdmUI:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.bar.close()
        return False

    def advance(self) -> None:
        self.bar.update(1)

    def _write(self, text: str) -> None:
        if not self.disable:
            self.bar.write(text, file=sys.stdout)

    def report_train(self, it: int, train_loss: float, tokens_sec: float, trained_tokens: float) -> None:
        """mlx-lm reports every step here; the report lines, on the user's schedule, are the Recorder's."""
        self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_sec:,.0f}", refresh=False)

    @contextlib.contextmanager
    def val_task(self, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def report_val(self, it: int, val_loss: float, val_time: float) -> None:
        self._write(f"step {it - 1 + self.offset:>6}  val loss   {val_loss:.4f}  ({val_time:.1f} s)")

    def report_save(self, checkpoint: Path) -> None:
        self._write(f"saved {checkpoint}")


def uses_nccl() -> bool:
    """mlx.launch's NCCL mode sets NCCL_HOST_IP; NCCL is the only backend that cannot reduce on the CPU stream."""
    return "NCCL_HOST_IP" in os.environ and mx.distributed.init().size() > 1


class _Proxy:
    """A module stand-in: overridden names first, everything else from the wrapped module."""

    def __init__(self, target, **overrides):
        self._target = target
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._target, name)


def _all_sum_off_cpu(x, *args, stream=None, **kwargs):
    """mlx-lm asks for ``stream=mx.cpu`` to sum reported losses; NCCL needs the GPU stream."""
    if stream is mx.cpu or (isinstance(stream, mx.Device) and stream.type == mx.cpu):
        stream = None
    return mx.distributed.all_sum(x, *args, stream=stream, **kwargs)


def nccl_safe_mx() -> _Proxy:
    """What ``mlx_lm.tuner.trainer`` sees as ``mx`` under NCCL: mlx.core with a GPU-stream ``all_sum``."""
    return _Proxy(mx, distributed=_Proxy(mx.distributed, all_sum=_all_sum_off_cpu))


@contextlib.contextmanager
def patched_trainer(offset: int, nccl: bool) -> Iterator[None]:
    """Scope the two substitutions to one ``train`` call, restoring mlx-lm's module afterwards."""
    saved = {"TrainUI": mlx_trainer.TrainUI, "mx": mlx_trainer.mx}
    mlx_trainer.TrainUI = lambda total, rank=0: TqdmUI(total, rank, offset)
    if nccl:
        mlx_trainer.mx = nccl_safe_mx()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mlx_trainer, name, value)


def with_reporting(recorder: Recorder, opts: types.SimpleNamespace, folder: Path) -> Recorder:
    """``recorder``, reporting to mlx-lm's callbacks for ``--report-to`` (built as ``mlx_lm.lora`` builds them) on
    rank 0: they get the recorder's reports (the user's windows, in global steps, so a resumed run continues its
    curve) and validations, after the NaN check."""
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    if opts.report_to and mx.distributed.init().rank() == 0:
        recorder.reporter = get_reporting_callbacks(opts.report_to, project_name=opts.project_name,
                                                    log_dir=str(folder), config=vars(opts))
    return recorder
