"""What ``python -m smoa_mlx.train`` does: fine-tune with SMoA (or HiRA / LoRA / DoRA baselines) on mlx-lm's
training loop.

Everything goes through :func:`run`, which the CLI, ``scripts/compare.py`` and ``scripts/bench_train.py`` share:
it returns a result dict (losses, tokens/s, peak memory, wall time). Data-parallel under ``mlx.launch``: each rank
takes its share of every global batch and mlx-lm's trainer averages the gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
from mlx_lm.tuner.utils import build_schedule
from mlx_lm.utils import get_total_parameters
from tqdm import tqdm

from ..adapters.folder import apply_adapter, base_reference
from ..atomic import atomic_write_text
from ..config import SMoAConfig
from ..errors import DataError, OptionError, SMoAError, TrainingDiverged
from ..folder_lock import FolderLock
from ..layer import live_inference
from ..loading import describe_model, load_model
from ..spectral import cached_orders
from .args import OPTIMIZERS, SMOA_KEYS, parse_args, resolve, schedule_note
from .checkpoint import (
    SCHEDULE_KEYS,
    STATE_FILE,
    TrainingState,
    check_adapter_path,
    checkpoint_name,
    load_state,
    restore_optimizer,
    rng_key,
    set_rng_key,
)
from .checkpoint import save_state as save_training_state
from .data import check_data, load_splits
from .loop import BatchStream, Recorder, patched_trainer, uses_nccl, with_reporting
from .methods import Method
from .preview import answer, held_out_question, question_text
from .report import format_summary, plot_losses
from .signals import Interrupted, StopSignals

__all__ = ["run", "train_adapter", "main", "TrainingDiverged"]

LOSS_CURVE = "loss_curve.png"
RESULT_FILE = "train_result.json"  # the result dict of run(), for scripts that drive the CLI


def _say(*parts: Any) -> None:
    """One line on stdout from rank 0 only (every rank of a data-parallel run runs this code), through tqdm so
    that a progress bar on the terminal is not torn."""
    if mx.distributed.init().rank() == 0:
        tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)


def _method(opts: types.SimpleNamespace) -> Method:
    """The adapter kind to train, with its settings gathered into one SMoAConfig."""
    return Method(opts.fine_tune_type, SMoAConfig(**{key: getattr(opts, key) for key in SMOA_KEYS}))


def _identity(opts: types.SimpleNamespace) -> dict[str, Any]:
    """What fixes the adapter's shape and the meaning of its weights, recorded in every checkpoint: a --resume with
    other values would load weights into an adapter they do not fit (``checkpoint.IDENTITY_KEYS``)."""
    return {
        "fine_tune_type": opts.fine_tune_type,
        "rank": opts.rank,
        "blocks": opts.blocks,
        "alpha": opts.alpha,
        "branch_ranks": opts.branch_ranks,
        "target_modules": list(opts.target_modules),
        "num_layers": opts.num_layers,
        "model": opts.model,
        # only when set, so that checkpoints made before the option existed still resume
        **({"grad_accumulation_steps": opts.grad_accumulation_steps} if opts.grad_accumulation_steps > 1 else {}),
    }


def _schedule(opts: types.SimpleNamespace) -> dict[str, Any]:
    """The options that fix the learning-rate schedule and the data order, recorded in every checkpoint: a --resume
    with others would not continue the run (``checkpoint.SCHEDULE_KEYS``)."""
    return {key: getattr(opts, key) for key in SCHEDULE_KEYS}


def _saved_config(opts: types.SimpleNamespace) -> dict[str, Any]:
    """What adapter_config.json records beside the adapter: the base it was trained on, and the run's options (fuse
    reads the data and batch settings back for its loss check), less the two that only say how this run began."""
    return {"model": base_reference(opts.model),
            "training": {k: v for k, v in vars(opts).items() if k not in ("force", "resume")}}


def default_schedule(opts: types.SimpleNamespace) -> dict[str, Any]:
    """The reference runs' schedule as an mlx-lm ``lr_schedule``: linear warmup from 0, then cosine decay to 0.

    The optimizer counts its own steps: with gradient accumulation, one per ``grad_accumulation_steps`` batches.
    """
    per_update = opts.grad_accumulation_steps
    iters, warmup = opts.iters // per_update, opts.warmup // per_update
    return {"name": "cosine_decay", "arguments": [opts.learning_rate, max(iters - warmup, 1), 0.0],
            "warmup": warmup, "warmup_init": 0.0}


# mlx_lm.lora's optimizer names, each the mlx.optimizers class of that name.
OPTIMIZER_CLASSES = {
    name: next(cls for attr, cls in vars(optim).items() if attr.lower() == name and isinstance(cls, type))
    for name in OPTIMIZERS
}


def _optimizer(opts: types.SimpleNamespace) -> optim.Optimizer:
    """As ``mlx_lm.lora`` builds it (``build_schedule``, ``optimizer_config``); the default schedule is ours."""
    lr = build_schedule(opts.lr_schedule or default_schedule(opts))
    extra = (opts.optimizer_config or {}).get(opts.optimizer, {})
    try:
        return OPTIMIZER_CLASSES[opts.optimizer](learning_rate=lr, **extra)
    except TypeError as e:
        raise OptionError(f"optimizer_config.{opts.optimizer}: {e}") from None


def _finite(model: nn.Module) -> bool:
    """One reduction and one sync per call: this runs after every step."""
    params = [v for _, v in tree_flatten(model.trainable_parameters())]
    return bool(mx.all(mx.stack([mx.isfinite(p).all() for p in params])).item()) if params else True


class _Saver:
    """Checkpoints on rank 0: the numbered weights, the adapter (weights and config), then the training state,
    the commit point: a kill before it leaves the previous checkpoint in charge, and a state never names a step
    whose adapter and config are not on disk yet (a resume reads the config; a finished state is the final adapter).
    """

    def __init__(self, folder: Path, method: Method, model: nn.Module, optimizer, recorder: Recorder,
                 identity: dict, schedule: dict, extra: dict):
        self.folder, self.method, self.model, self.optimizer = folder, method, model, optimizer
        self.recorder, self.identity, self.schedule, self.extra = recorder, identity, schedule, extra
        self.rank0 = mx.distributed.init().rank() == 0
        self.last_good: Optional[int] = None

    def check(self, step: int) -> None:
        """Stop a diverged run before its NaN weights can overwrite the last good checkpoint."""
        if not _finite(self.model):
            kept = f"the last good checkpoint (step {self.last_good})" if self.last_good else "no checkpoint"
            raise TrainingDiverged(f"the adapter weights became NaN/inf by step {step}; kept {kept} in {self.folder}")

    def save(self, step: int) -> None:
        """A checkpoint at ``step`` (written by rank 0; every rank remembers it as the last good one)."""
        if self.rank0:
            name = checkpoint_name(step)
            self.method.save(self.model, self.folder, self.extra, weights_name=name)
            self.method.save(self.model, self.folder, self.extra)
            state = TrainingState(step, rng_key(), name, self.recorder.state, self.identity, self.schedule)
            save_training_state(self.folder, self.optimizer, state)
        self.last_good = step


class _Boundary:
    """What happens between two steps (mlx-lm has evaluated step ``step`` and fetches the next batch), in this
    order: the NaN check, a validation and a checkpoint when the global schedule says so (``step`` is the global
    step, so a resumed run keeps the uninterrupted run's schedule), then a pending stop signal: checkpoint, stop,
    at the first boundary where an optimizer update was just taken (mlx-lm's accumulated gradient of an unfinished
    ``--grad-accumulation-steps`` window lives in its loop and cannot be saved)."""

    def __init__(self, saver: _Saver, validate, opts, stops: StopSignals):
        self.saver, self.validate, self.opts, self.stops = saver, validate, opts, stops

    def __call__(self, step: int) -> None:
        self.saver.check(step)
        if self.validate is not None and step % self.opts.steps_per_eval == 0:
            self.validate(step)
        if step % self.opts.save_every == 0:
            self.saver.save(step)
        if self.stops.pending is not None and step % self.opts.grad_accumulation_steps == 0:
            if self.saver.last_good != step:
                self.saver.save(step)
            self.stops.raise_pending(saved_step=step)


def _optimizer_step(optimizer: optim.Optimizer) -> Optional[int]:
    """The optimizer's own update count (None before its first update): with gradient accumulation it lags the
    batch count, which tells whether the current step ends an update."""
    step = optimizer.state.get("step") if isinstance(optimizer.state, dict) else None
    return None if step is None else int(step.item())


def run(args: Union[types.SimpleNamespace, dict, None] = None, **overrides: Any) -> dict[str, Any]:
    """Train (and/or test) as the CLI does; returns the result dict. ``args`` holds option names as in the YAML
    config (``learning_rate``, ``adapter_path``...); keyword overrides win. Missing options take the defaults.

    SIGINT, SIGTERM and SIGHUP stop training at the next step boundary with a checkpoint, then raise
    :class:`~smoa_mlx.train.signals.Interrupted` (a ``KeyboardInterrupt``; see :mod:`.signals`).
    """
    given = dict(vars(args) if isinstance(args, types.SimpleNamespace) else (args or {}))
    given.update(overrides)
    opts = resolve(given)
    with StopSignals() as stops:
        return _run(opts, stops)


def _run(opts: types.SimpleNamespace, stops: StopSignals) -> dict[str, Any]:
    """:func:`run` once its options are resolved: everything that can be refused (data, folder) is checked before
    the model loads; then train and/or test, and the summary, with the result dict saved beside the adapter."""
    wall = time.perf_counter()
    np.random.seed(opts.seed)
    mx.random.seed(opts.seed)
    world = mx.distributed.init()
    folder = Path(opts.adapter_path)
    method = _method(opts)
    identity = _identity(opts)
    need = (("train",) if opts.train else ()) + (("test",) if opts.test else ())
    checked = check_data(opts.data, need)  # before the model: a bad file should not cost a model load first
    # One training run per adapter folder: a second one is refused before it reads or writes anything there.
    lock = FolderLock(folder) if opts.train and world.rank() == 0 else contextlib.nullcontext()
    with lock:
        if getattr(lock, "note", None):
            _say(lock.note)
        if opts.train:
            _claim_adapter_path(opts, folder, identity, world.rank() == 0)
        _say(f"Loading model {describe_model(opts.model)}")
        model, tokenizer = load_model(opts.model)
        splits = load_splits(opts.data, tokenizer, opts.max_seq_length, opts.batch_size, opts.mask_prompt, need,
                             warn=_say, checked=checked)
        result: dict[str, Any] = {"method": opts.fine_tune_type, "rank": opts.rank, "blocks": opts.blocks,
                                  "adapter_path": str(folder), "world_size": world.size(), "test_loss": None}
        question = held_out_question(checked) if opts.train and opts.preview and world.rank() == 0 else None
        if question:  # answered before and after training, to show what the adapter changed
            before = answer(model, tokenizer, question)
            _say(f"Held-out question: {question_text(question)}\n  before training: {before}")
        if opts.train:
            result.update(_train(opts, model, splits, method, identity, folder, stops))
            if question:
                result["preview"] = {"question": question_text(question), "before": before,
                                     "after": answer(model, tokenizer, question)}
        else:
            apply_adapter(model, folder)
        if opts.test:
            result["test_loss"] = _test_loss(model, splits["test"], opts)
        result["wall_time_s"] = time.perf_counter() - wall
        if opts.train:
            _say(format_summary(result))
            if world.rank() == 0:
                atomic_write_text(folder / RESULT_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _claim_adapter_path(opts: types.SimpleNamespace, folder: Path, identity: dict[str, Any], rank0: bool) -> None:
    """Refuse, before the model loads, a folder whose adapter this run may not replace or continue; under --force,
    drop the replaced run's training state, so that a later --resume cannot pick it up."""
    _say(schedule_note(opts))
    note = check_adapter_path(folder, identity, opts.resume, opts.force, _schedule(opts))
    if note:
        _say(note)
        if rank0:
            (folder / STATE_FILE).unlink(missing_ok=True)


def _test_loss(model: nn.Module, split, opts: types.SimpleNamespace) -> float:
    """--test: the loss on the test split, printed with its perplexity."""
    loss = _evaluate(model, split, opts, opts.test_batches)
    _say(f"test loss {loss:.4f}, test ppl {math.exp(loss):.3f}")
    return loss


def _evaluate(model: nn.Module, split, opts: types.SimpleNamespace, batches: int) -> float:
    """mlx-lm's evaluate (mean loss per token over all ranks) on fixed batches."""
    model.eval()
    with patched_trainer(0, uses_nccl()):
        return evaluate(model, split, opts.batch_size, batches, opts.max_seq_length,
                        iterate_batches=BatchStream(opts.seed))


def _validator(model: nn.Module, split, opts: types.SimpleNamespace, recorder: Recorder):
    """Validation after a global step, recorded and printed (``label`` replaces the timing, e.g. "final")."""

    def validate(step: int, label: Optional[str] = None) -> None:
        tic = time.perf_counter()
        with live_inference():  # no merged-weight copies on top of training's memory
            loss = _evaluate(model, split, opts, opts.val_batches)
        model.train()
        recorder.record_val(step, loss)
        _say(f"step {step:>6}  val loss   {loss:.4f}  ({label or f'{time.perf_counter() - tic:.1f} s'})")

    return validate


def _train(opts: types.SimpleNamespace, model: nn.Module, splits: dict, method: Method, identity: dict,
           folder: Path, stops: StopSignals) -> dict[str, Any]:
    """Train the adapter in ``folder`` from scratch or from its checkpoint; returns the training figures."""
    state, saved_optimizer = _resume_or_apply(opts, model, method, folder)
    start, history = (state.step, state.history) if state is not None else (0, None)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = get_total_parameters(model)
    optimizer = _optimizer(opts)
    if state is not None:
        restore_optimizer(optimizer, model.trainable_parameters(), saved_optimizer)
        set_rng_key(state.rng)
    recorder = Recorder(start, history, every=opts.steps_per_report, last=opts.iters, say=_say)
    with_reporting(recorder, opts, folder)
    saver = _Saver(folder, method, model, optimizer, recorder, identity, _schedule(opts), _saved_config(opts))
    saver.last_good = start or None
    validate = _validator(model, splits["valid"], opts, recorder) if "valid" in splits else None
    out = {"start_step": start, "steps": max(opts.iters, start), "trainable_parameters": trainable,
           "total_parameters": total, "trainable_percent": 100.0 * trainable / max(total, 1)}
    if start < opts.iters:
        _train_steps(opts, splits["train"], saver, validate, stops, start)
    out.update(_figures(recorder, folder, opts))
    return out


def _resume_or_apply(opts: types.SimpleNamespace, model: nn.Module, method: Method,
                     folder: Path) -> tuple[Optional[TrainingState], Optional[dict[str, mx.array]]]:
    """Put the adapter layers into ``model``: for --resume the checkpoint's, returning its training state and
    optimizer arrays to restore the rest of the run from; else fresh ones on the spectral order, (None, None)."""
    if opts.resume and (folder / STATE_FILE).exists():
        state, saved_optimizer = load_state(folder)
        method.restore(model, folder, state.weights)
        _say(f"Resuming from step {state.step} ({folder / state.weights})")
        return state, saved_optimizer
    if opts.resume:
        load_state(folder)  # raises: there is no checkpoint to resume from
        return None, None
    _say(f"Applying {opts.fine_tune_type} to {describe_model(opts.model)}")
    with cached_orders(disk=True):  # the orders depend on W0 alone: a second run reads them back
        method.apply(model, progress=lambda xs: tqdm(xs, desc="spectral order", leave=False, file=sys.stderr,
                                                      disable=mx.distributed.init().rank() != 0))
    return None, None


def _training_args(opts: types.SimpleNamespace, start: int, scratch: Path) -> TrainingArgs:
    """mlx-lm's trainer settings for the steps after ``start``.

    mlx-lm reports every step (the Recorder averages them over the user's windows) and neither validates nor
    saves: its schedule would count from the resume step, and it validates before a step, so twice at the end.
    Validation and checkpoints are _Boundary's, on the global steps.
    """
    return TrainingArgs(
        batch_size=opts.batch_size,
        iters=opts.iters - start,
        val_batches=opts.val_batches,
        steps_per_report=1,
        steps_per_eval=opts.iters + 1,
        steps_per_save=opts.iters + 1,
        max_seq_length=opts.max_seq_length,
        adapter_file=str(scratch / "mlx_lm_final.safetensors"),  # mlx-lm's unconditional save
        grad_checkpoint=opts.grad_checkpoint,
        grad_accumulation_steps=opts.grad_accumulation_steps,
    )


def _train_steps(opts: types.SimpleNamespace, split, saver: _Saver, validate, stops: StopSignals, start: int) -> None:
    """The steps from ``start`` to ``--iters`` through mlx-lm's trainer, then the final validation and save; on an
    interruption, what can be saved is, the user is told how to continue, and the interruption goes on up."""
    stream = BatchStream(opts.seed, start, _Boundary(saver, validate, opts, stops))
    try:
        with stops.deferred(), tempfile.TemporaryDirectory() as scratch:
            targs = _training_args(opts, start, Path(scratch))
            if validate is not None and start % opts.steps_per_eval == 0 and not saver.recorder.has_val(start):
                validate(start)  # step 0, or a scheduled validation the interrupted run did not get to
            stops.raise_pending(saved_step=saver.last_good)
            with patched_trainer(start, uses_nccl()):
                train(saver.model, saver.optimizer, split, None, targs, iterate_batches=stream,
                      training_callback=saver.recorder)
            saver.check(opts.iters)
            if validate is not None:
                validate(opts.iters, "final")
            saver.save(opts.iters)
            stops.raise_pending(saved_step=opts.iters)
    except KeyboardInterrupt as e:
        step = _save_on_interrupt(e, saver, start, opts.grad_accumulation_steps)
        what = e.name if isinstance(e, Interrupted) else "Interrupted"
        saved = (f"saved the adapter at step {step} in {saver.folder} (continue with --resume)" if step
                 else "nothing new was saved")
        _say(f"\n{what}: stopped; {saved}")
        raise


def _save_on_interrupt(e: KeyboardInterrupt, saver: _Saver, start: int, per_update: int) -> Optional[int]:
    """The step saved for this interruption: already saved at a step boundary (a signal), none (a second signal:
    stop at once), or, for a KeyboardInterrupt raised in-process, the current step if it is complete and ends an
    optimizer update (``per_update`` batches each)."""
    if isinstance(e, Interrupted):
        return e.saved_step
    step, updates = saver.recorder.step, _optimizer_step(saver.optimizer)
    if updates is not None and step > start and step % per_update == 0 and updates * per_update == step \
            and _finite(saver.model):
        saver.save(step)
        return step
    return None


def _figures(recorder: Recorder, folder: Path, opts: types.SimpleNamespace) -> dict[str, Any]:
    """The result dict's losses and throughput, and the loss curve drawn by rank 0 beside the adapter."""
    h = recorder.history
    out = {
        "train_losses": h["train"],
        "val_losses": h["val"],
        "initial_val_loss": h["val"][0][1] if h["val"] else None,
        "final_val_loss": h["val"][-1][1] if h["val"] else None,
        "final_train_loss": h["train"][-1][1] if h["train"] else None,
        "trained_tokens": int(recorder.tokens),
        "train_time_s": recorder.train_time,
        "tokens_per_second": recorder.tokens_per_second,
        "peak_memory_gb": max(recorder.peak_memory_gb, mx.get_peak_memory() / 1e9),
        "loss_curve": None,
    }
    if mx.distributed.init().rank() == 0 and (h["train"] or h["val"]):
        blocks = f" K={opts.blocks}" if opts.fine_tune_type in ("smoa", "hira") else ""
        title = f"{opts.fine_tune_type} r={opts.rank}{blocks}"
        out["loss_curve"] = str(plot_losses(h, folder / LOSS_CURVE, f"{title} on {describe_model(opts.model)}"))
    return out


def train_adapter(model: Optional[str] = None, data: Optional[str] = None, **options: Any) -> dict[str, Any]:
    """Keyword form of :func:`run` for scripts: ``train_adapter(model, data, fine_tune_type="lora", iters=50)``."""
    return run({"model": model, "data": data, **options})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: exit 0; 130, 143 or 129 after SIGINT, SIGTERM or SIGHUP (once the checkpoint is saved); 1
    when training diverged; 2 with one ``error:`` line for bad input, never a traceback."""
    try:
        opts = parse_args(argv)
        run(opts)
    except KeyboardInterrupt as e:  # SIGINT, SIGTERM, SIGHUP: after saving (see run)
        return getattr(e, "exit_code", 130)
    except TrainingDiverged as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    except (SMoAError, DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
