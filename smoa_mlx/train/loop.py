"""What the trainer adds around ``mlx_lm.tuner.trainer.train`` without forking it.

mlx-lm's ``train`` takes ``iterate_batches`` and ``training_callback`` arguments; they are the hooks used here:

* :class:`BatchStream` wraps mlx-lm's ``iterate_batches``. It gives training its own NumPy RNG (mlx-lm's draws
  from the global one, which evaluation also consumes), so the data order is a function of the seed alone and a
  resumed run can replay it; it skips the steps already done; and it calls ``on_step(step)`` when the batch of the
  next step is fetched, i.e. right after mlx-lm has evaluated step ``step`` (the place to checkpoint).
* :class:`Recorder` keeps the loss history, totals throughput, and stops on a non-finite loss;
  :func:`with_reporting` adds mlx-lm's reporting callbacks (``--report-to wandb``) behind it.
* :func:`patched_trainer` swaps mlx-lm's rich progress display for a tqdm one that counts global steps, and on
  NCCL reroutes the trainer's ``all_sum(..., stream=mx.cpu)`` calls (NCCL cannot reduce on the CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Callable, Iterator, Optional

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

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
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
    """Loss history in global steps, throughput totals, and the NaN stop."""

    def __init__(self, start_step: int = 0, history: Optional[dict] = None):
        self.offset = start_step
        self.history = {"train": [], "val": []}
        for key in self.history:
            self.history[key] = [list(x) for x in (history or {}).get(key, [])]
        self.tokens = 0
        self.windows: list[tuple[int, float]] = []  # (tokens, seconds) per report
        self.peak_memory_gb = 0.0

    def on_train_loss_report(self, info: dict) -> None:
        step, loss = info["iteration"] + self.offset, float(info["train_loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss is {loss} at step {step}")
        self.history["train"].append([step, loss])
        # mlx-lm reports tokens and tokens/s of the steps since the last report: recover their time.
        tokens = info["trained_tokens"] - self.tokens
        self.tokens = info["trained_tokens"]
        if info["tokens_per_second"] > 0:
            self.windows.append((tokens, tokens / info["tokens_per_second"]))
        self.peak_memory_gb = max(self.peak_memory_gb, float(info["peak_memory"]))

    @property
    def train_time(self) -> float:
        return sum(t for _, t in self.windows)

    @property
    def tokens_per_second(self) -> float:
        """Steady-state throughput: the first report window, which holds graph compilation, is left out when
        there are others."""
        windows = self.windows[1:] if len(self.windows) > 1 else self.windows
        seconds = sum(t for _, t in windows)
        return sum(n for n, _ in windows) / seconds if seconds > 0 else 0.0

    def on_val_loss_report(self, info: dict) -> None:
        step, loss = info["iteration"] + self.offset, float(info["val_loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(f"validation loss is {loss} at step {step}")
        if not self.history["val"] or self.history["val"][-1][0] != step:
            self.history["val"].append([step, loss])


class TqdmUI:
    """Drop-in for mlx-lm's ``TrainUI`` (same methods): a tqdm bar over global steps, losses above it."""

    def __init__(self, total_iters: int, rank: int = 0, offset: int = 0):
        self.offset = offset
        self.disable = rank != 0
        self.bar = tqdm(total=offset + total_iters, initial=offset, desc="train", unit="step", dynamic_ncols=True,
                        disable=self.disable, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False

    def advance(self) -> None:
        self.bar.update(1)

    def _write(self, text: str) -> None:
        if not self.disable:
            self.bar.write(text, file=sys.stdout)

    def report_train(self, it, train_loss, tokens_sec, trained_tokens) -> None:
        self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_sec:,.0f}", refresh=False)
        self._write(f"step {it + self.offset:>6}  train loss {train_loss:.4f}  {tokens_sec:,.0f} tok/s  "
                    f"{trained_tokens / 1000:.1f}k tokens")

    @contextlib.contextmanager
    def val_task(self, total: int):
        yield lambda: None

    def report_val(self, it, val_loss, val_time) -> None:
        self._write(f"step {it - 1 + self.offset:>6}  val loss   {val_loss:.4f}  ({val_time:.1f} s)")

    def report_save(self, checkpoint) -> None:
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


def nccl_safe_mx():
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


class _Reporting(TrainingCallback):
    """The recorder first (it stops on a NaN before anything is logged), then mlx-lm's reporting callbacks, which
    see global steps as the recorder does (a resumed run continues its curve)."""

    def __init__(self, recorder: Recorder, reporter: TrainingCallback, offset: int):
        self.recorder, self.reporter, self.offset = recorder, reporter, offset

    def on_train_loss_report(self, info: dict) -> None:
        self.recorder.on_train_loss_report(info)
        self.reporter.on_train_loss_report({**info, "iteration": info["iteration"] + self.offset})

    def on_val_loss_report(self, info: dict) -> None:
        self.recorder.on_val_loss_report(info)
        self.reporter.on_val_loss_report({**info, "iteration": info["iteration"] + self.offset})


def with_reporting(recorder: Recorder, opts, folder, offset: int) -> TrainingCallback:
    """``recorder``, plus mlx-lm's callbacks for ``--report-to`` (built as ``mlx_lm.lora`` builds them) on rank 0."""
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    if not opts.report_to or mx.distributed.init().rank() != 0:
        return recorder
    reporter = get_reporting_callbacks(opts.report_to, project_name=opts.project_name, log_dir=str(folder),
                                       config=vars(opts))
    return _Reporting(recorder, reporter, offset) if reporter is not None else recorder
