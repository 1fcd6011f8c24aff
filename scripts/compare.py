"""SMoA against HiRA, LoRA and DoRA at matched trainable-parameter budgets, on real tasks, with one protocol.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        python scripts/compare.py --out results/quality.json --doc docs/QUALITY.md

Every fine-tune goes through ``smoa_mlx.train.run`` (the code path of ``python -m smoa_mlx.train``) on the
embedded SmolLM2-135M-Instruct. Protocol, identical for every method: the same train/valid/test data (BIG-bench
tasks split by :mod:`smoa_mlx.eval.bigbench`, or the package's own training set), the same steps, batch, warmup +
cosine schedule, dropout, target modules and prompt masking; each method's learning rate is chosen from the same
grid on the validation split (with the first seed), then every seed is trained at that rate and scored on the
test split. Multiple-choice tasks score the option with the highest mean log-likelihood per token
(:mod:`smoa_mlx.eval.choice_eval`); the package's own set, which has no options, scores the test loss. The zero-shot
model is the floor.

Budgets: ``lora`` / ``dora`` / ``hira`` at rank r, ``smoa-k2`` at total rank 2r (equal parameters), ``smoa-k4`` at
4r (equal), ``smoa-k2-half`` at r (half LoRA's parameters), ``smoa-k4-quarter`` at r (a quarter).

Resumable: each finished run is written into ``--out`` at once, and runs already there are skipped, so a stopped
grid continues where it stopped. ``--budget-seconds`` stops before a run that would not finish in time; the
table and plot are written either way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality_report import metric_of, select_lr, write_report  # noqa: E402

from smoa_mlx import train  # noqa: E402
from smoa_mlx.atomic import atomic_write_text  # noqa: E402
from smoa_mlx.eval.bigbench import TASKS, reference_accuracies, task_splits, write_completions  # noqa: E402
from smoa_mlx.eval.choice_eval import Encoded, encode_examples, score_choices  # noqa: E402
from smoa_mlx.adapters import apply_adapter  # noqa: E402
from smoa_mlx.loading import load_model  # noqa: E402
from smoa_mlx.models.embedded import EMBEDDED_NAME, build_model, save_embedded  # noqa: E402
from smoa_mlx.spectral import cached_orders  # noqa: E402
from smoa_mlx.train.loop import BatchStream  # noqa: E402
from smoa_mlx.train.data import PACKAGED_DATA, detect_format, load_splits, read_jsonl  # noqa: E402

FORMAT = "smoa-mlx-quality/1"
DEFAULT_TASK = "default"  # the training set shipped in smoa_mlx/data
# name: (fine_tune_type, rank as a multiple of --rank, blocks K)
VARIANTS: dict[str, tuple[str, int, int]] = {
    "lora": ("lora", 1, 1),
    "dora": ("dora", 1, 1),
    "hira": ("hira", 1, 1),
    "smoa-k2-half": ("smoa", 1, 2),
    "smoa-k2": ("smoa", 2, 2),
    "smoa-k4": ("smoa", 4, 4),
    "smoa-k4-quarter": ("smoa", 1, 4),
}
# Options that define the protocol: runs made under other values are not comparable, so a results file is
# continued only with the same ones.
PROTOCOL = ("rank", "iters", "batch_size", "warmup", "lrs", "selection_seed", "max_train", "max_valid", "max_test",
            "max_seq_length", "dropout", "val_batches", "scoring")


class BudgetReached(Exception):
    pass


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add = p.add_argument
    add("--out", required=True, help="results JSON (continued if it exists)")
    add("--doc", help="write the Markdown report here (e.g. docs/QUALITY.md); its plot goes next to it")
    add("--plot", help="plot PNG (default: <doc stem>.png next to --doc)")
    add("--work", help="folder for data splits and adapters (default: <out stem>-work next to --out)")
    add("--label", default="", help="what produced the numbers, for the report (e.g. 'H200, MLX CUDA')")
    add("--tasks", type=_csv(str), default=["social_iqa", "winowhy", DEFAULT_TASK],
        help=f"comma-separated, from {', '.join(list(TASKS) + [DEFAULT_TASK])}")
    add("--methods", type=_csv(str), default=["lora", "dora", "hira", "smoa-k2-half", "smoa-k2", "smoa-k4"],
        help=f"comma-separated, from {', '.join(VARIANTS)}")
    add("--seeds", type=_csv(int), default=[0, 1, 2], help="the first one also selects the learning rate")
    add("--lrs", type=_csv(float), default=[2e-4, 6e-4, 2e-3, 6e-3], help="learning-rate grid, the same for all")
    add("--rank", type=int, default=8, help="LoRA rank r; the other budgets derive from it")
    add("--iters", type=int, default=200)
    add("--batch-size", type=int, default=16)
    add("--warmup", type=int, help="warmup steps (default iters // 10), then cosine decay")
    add("--dropout", type=float, default=0.05)
    add("--max-train", type=int, default=0, help="cap on training examples per task (0: all)")
    add("--max-valid", type=int, default=0, help="cap on validation examples (0: all)")
    add("--max-test", type=int, default=0, help="cap on test examples (0: all)")
    add("--max-seq-length", type=int, default=512)
    add("--val-batches", type=int, default=4, help="validation-loss batches during training (logged only)")
    add("--scoring", choices=("mean", "sum"), default="mean",
        help="rank options by mean (default) or summed log-likelihood of their tokens")
    add("--score-tokens", type=int, default=4096, help="padded tokens per scoring batch")
    add("--budget-seconds", type=float, default=0.0, help="stop cleanly before exceeding this wall time (0: none)")
    add("--data-root", help="folder holding the BIG-bench <task>.json files")
    add("--model", help="an mlx-lm llama model folder instead of the embedded SmolLM2-135M-Instruct (tests use a "
        "tiny one)")
    add("--cache-model", metavar="DIR", help="write the embedded model once as an mlx-lm float32 folder here and load "
        "it from there in every run (same weights and tokenizer; skips dequantizing the GGUF run after run)")
    return p


def check_options(opts: argparse.Namespace) -> None:
    for name in opts.tasks:
        if name not in TASKS and name != DEFAULT_TASK:
            raise ValueError(f"--tasks: unknown task {name!r} (known: {', '.join(list(TASKS) + [DEFAULT_TASK])})")
    for name in opts.methods:
        if name not in VARIANTS:
            raise ValueError(f"--methods: unknown method {name!r} (known: {', '.join(VARIANTS)})")
    if not opts.seeds or not opts.lrs or not opts.tasks or not opts.methods:
        raise ValueError("--tasks, --methods, --seeds and --lrs each need at least one value")
    for key in ("rank", "iters", "batch_size"):
        if getattr(opts, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be positive")
    if opts.warmup is None:
        opts.warmup = opts.iters // 10
    opts.selection_seed = opts.seeds[0]
    opts.load_from = opts.model


def cache_embedded(folder: Path) -> str:
    """The embedded model as an mlx-lm folder (written once, atomically): loading it is a safetensors read, where
    the GGUF path dequantizes and rebuilds the tokenizer on every load."""
    if not (folder / "config.json").is_file():
        save_embedded(folder, force=True)
    return str(folder)


def protocol(opts: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(opts, key) for key in PROTOCOL}


# -- the results file -------------------------------------------------------------------------------------
def load_results(path: Path, settings: dict[str, Any], model: str = EMBEDDED_NAME) -> dict[str, Any]:
    if not path.exists():
        return {"format": FORMAT, "model": model, "settings": settings, "invocations": [], "tasks": {},
                "zero_shot": [], "runs": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); move it away to start afresh") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a results file of this script (format {data.get('format')!r})")
    old = data.get("settings", {})
    differ = [k for k in PROTOCOL if old.get(k) != settings[k]]
    if data.get("model") != model:
        differ.append("model")
        settings = dict(settings, model=model)
        old = dict(old, model=data.get("model"))
    if differ:
        pairs = ", ".join(f"{k}: file {old.get(k)!r} vs now {settings[k]!r}" for k in differ)
        raise ValueError(f"{path} was made with another protocol ({pairs}); use another --out or the same options")
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def find_run(data: dict, task: str, variant: str, lr: float, seed: int) -> Optional[dict]:
    for run in data["runs"]:
        if (run["task"], run["variant"], run["seed"]) == (task, variant, seed) and np.isclose(run["lr"], lr):
            return run
    return None


# -- models and metrics -----------------------------------------------------------------------------------
class Base:
    """The base model's weights kept on the host (NumPy), so scoring builds a fresh model per run in a
    fraction of a second without the base sitting in MLX memory (it would inflate every run's peak memory)."""

    def __init__(self, model: Optional[str] = None) -> None:
        loaded, self.tokenizer, self.config = load_model(model, return_config=True)
        if self.config.get("model_type", "llama") != "llama" or "quantization" in self.config:
            raise ValueError(f"--model {model}: compare.py needs a dense llama model (got {self.config.get('model_type')})")
        self.weights = {k: np.array(v) for k, v in tree_flatten(loaded.parameters())}
        del loaded

    def model(self, adapter: Optional[Path] = None):
        model = build_model(self.config, {k: mx.array(v) for k, v in self.weights.items()})
        if adapter is not None:
            apply_adapter(model, adapter)  # the saved adapter, read back as any user would load it
        model.eval()
        return model


class Task:
    """One task's data on disk for the trainer, and how a model is scored on its valid / test splits."""

    def __init__(self, name: str, opts: argparse.Namespace, work: Path):
        self.name, self.opts = name, opts
        limits = {"train": opts.max_train, "valid": opts.max_valid, "test": opts.max_test}
        if name == DEFAULT_TASK:
            first = PACKAGED_DATA / "train.jsonl"
            if not first.is_file():
                raise FileNotFoundError(f"task {DEFAULT_TASK!r}: the package ships no training set ({first} missing)")
            self.folder = None
            self.metric = "loss"
            rows = read_jsonl(first)
            self.mask_prompt = detect_format(rows[0], str(first)) != "text"
            self.splits = None
            self.sizes = {s: len(read_jsonl(PACKAGED_DATA / f"{s}.jsonl")) for s in ("train", "valid", "test")
                          if (PACKAGED_DATA / f"{s}.jsonl").is_file()}
            self.reference: dict[str, float] = {}
        else:
            self.splits = task_splits(name, opts.data_root, limits)
            self.folder = write_completions(self.splits, work / "data" / name)
            self.metric = "accuracy"
            self.mask_prompt = True
            self.sizes = {s: len(v) for s, v in self.splits.items()}
            self.reference = reference_accuracies(self.splits["train"], self.splits["test"])
        self._loss_splits = None
        self._train_split = None
        self._encoded: dict[str, Encoded] = {}

    def sequence_tokens(self, tokenizer, seed: int) -> int:
        """Tokens (prompt and answer, no padding) a run of this seed trains on: its batches replayed through the
        trainer's own deterministic batch stream. mlx-lm's own tokens/s counts only the unmasked answer tokens."""
        if self._train_split is None:
            self._train_split = load_splits(None if self.folder is None else str(self.folder), tokenizer,
                                            self.opts.max_seq_length, self.opts.batch_size, self.mask_prompt,
                                            need=("train",))["train"]
        stream = BatchStream(seed)(self._train_split, self.opts.batch_size, self.opts.max_seq_length, loop=True)
        return sum(int(next(stream)[1][:, 1].sum().item()) for _ in range(self.opts.iters))

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "sizes": self.sizes, "reference": self.reference,
                "data": "smoa_mlx/data (packaged)" if self.folder is None else f"BIG-bench {self.name}"}

    def evaluate(self, model, tokenizer, split: str) -> dict[str, float]:
        if self.metric == "accuracy":
            if split not in self._encoded:
                self._encoded[split] = encode_examples(tokenizer, self.splits[split])
            scores = score_choices(model, tokenizer, self._encoded[split], self.opts.score_tokens)
            return {f"{split}_accuracy": scores.accuracy("mean"), f"{split}_accuracy_sum": scores.accuracy("sum")}
        from mlx_lm.tuner.trainer import evaluate

        if self._loss_splits is None:
            self._loss_splits = load_splits(None, tokenizer, self.opts.max_seq_length, self.opts.batch_size,
                                            self.mask_prompt, need=("valid", "test"))
        loss = evaluate(model, self._loss_splits[split], self.opts.batch_size, -1, self.opts.max_seq_length)
        return {f"{split}_loss": float(loss)}


def train_options(task: Task, variant: str, lr: float, seed: int, opts, folder: Path) -> dict[str, Any]:
    """The one place a run's training options are set: everything but method, rank, lr and seed is shared."""
    kind, mult, blocks = VARIANTS[variant]
    options = dict(
        model=opts.load_from, data=None if task.folder is None else str(task.folder), train=True, test=False,
        fine_tune_type=kind, rank=opts.rank * mult, learning_rate=lr, iters=opts.iters, batch_size=opts.batch_size,
        warmup=opts.warmup, seed=seed, adapter_path=str(folder), force=True, mask_prompt=task.mask_prompt,
        dropout=opts.dropout, val_batches=opts.val_batches, steps_per_eval=opts.iters, save_every=opts.iters,
        steps_per_report=max(1, opts.iters // 10), max_seq_length=opts.max_seq_length, preview=False,
    )
    if kind in ("smoa", "hira"):
        options["blocks"] = blocks
    return options


class Grid:
    def __init__(self, opts: argparse.Namespace, out: Path, work: Path, data: dict):
        self.opts, self.out, self.work, self.data = opts, out, work, data
        self.start = time.monotonic()
        self.durations: dict[str, list[float]] = {}
        self.base: Optional[Base] = None

    def _base(self) -> Base:
        if self.base is None:
            self.base = Base(self.opts.load_from)
        return self.base

    def _check_budget(self, task: str, what: str) -> None:
        if self.opts.budget_seconds <= 0:
            return
        elapsed = time.monotonic() - self.start
        every = [d for ds in self.durations.values() for d in ds]
        # The first run of a process also compiles MLX's kernels (on CUDA ~4x a warm run): it only counts
        # while nothing else has been measured.
        mine = self.durations.get(task, [])
        mine = mine[1:] if len(mine) > 1 else mine
        estimate = max(mine) if mine else max(every, default=0.0)
        if elapsed + estimate > self.opts.budget_seconds:
            raise BudgetReached(f"budget: {elapsed:.0f} s used of {self.opts.budget_seconds:.0f} s; "
                                f"next {what} would take about {estimate:.0f} s")

    def _save(self) -> None:
        save_results(self.out, self.data)

    def zero_shot(self, task: Task) -> None:
        if any(z["task"] == task.name for z in self.data["zero_shot"]):
            return
        self._check_budget(task.name, "zero-shot scoring")
        base = self._base()
        model = base.model()
        record = {"task": task.name, "method": "zero-shot"}
        for split in ("valid", "test"):
            record.update(task.evaluate(model, base.tokenizer, split))
        self.data["zero_shot"].append(record)
        self._save()
        print(f"[{task.name}] zero-shot: {_metrics_line(record)}", flush=True)

    def ensure(self, task: Task, variant: str, lr: float, seed: int, need_test: bool) -> dict:
        run = find_run(self.data, task.name, variant, lr, seed)
        folder = self.work / "adapters" / f"{task.name}-{variant}-lr{lr:g}-s{seed}"
        if run is not None and (run.get("diverged") or not need_test
                                or metric_of(run, "test", task.metric) is not None):
            return run
        if run is not None and (folder / "adapter_config.json").is_file():
            self._check_budget(task.name, "test scoring")
            base = self._base()
            run.update(task.evaluate(base.model(folder), base.tokenizer, "test"))
            self._save()
            return run
        if run is not None:  # scored on valid elsewhere, adapter gone: train it again
            self.data["runs"].remove(run)
        return self._train(task, variant, lr, seed, folder, need_test)

    def _train(self, task: Task, variant: str, lr: float, seed: int, folder: Path, need_test: bool) -> dict:
        self._check_budget(task.name, f"{variant} run")
        began = time.monotonic()
        mx.reset_peak_memory()
        kind, _, blocks = VARIANTS[variant]
        try:
            result = train.run(train_options(task, variant, lr, seed, self.opts, folder))
        except train.TrainingDiverged as e:  # a too-large rate is a result of the grid, not a failure of it
            run = {"task": task.name, "variant": variant, "method": kind, "lr": lr, "seed": seed, "diverged": str(e),
                   "wall_time_s": time.monotonic() - began}
            self.data["runs"].append(run)
            self._save()
            print(f"[{task.name}] {variant} lr={lr:g} seed={seed}: diverged ({e})", flush=True)
            return run
        run = {
            "task": task.name, "variant": variant, "method": kind, "rank": result["rank"],
            "blocks": blocks if kind in ("smoa", "hira") else None, "lr": lr, "seed": seed,
            "trainable_parameters": result["trainable_parameters"], "total_parameters": result["total_parameters"],
            "answer_tokens_per_second": result["tokens_per_second"], "answer_tokens": result["trained_tokens"],
            "train_time_s": result["train_time_s"], "peak_memory_gb": result["peak_memory_gb"],
            "final_train_loss": result["final_train_loss"], "final_val_loss": result["final_val_loss"],
            "train_losses": result["train_losses"],
        }
        base = self._base()
        run["sequence_tokens"] = task.sequence_tokens(base.tokenizer, seed)
        run["tokens_per_second"] = run["sequence_tokens"] / max(run["train_time_s"], 1e-9)
        model = base.model(folder)
        splits = ("valid", "test") if need_test else ("valid",)
        for split in splits:
            run.update(task.evaluate(model, base.tokenizer, split))
        run["wall_time_s"] = time.monotonic() - began
        self.durations.setdefault(task.name, []).append(run["wall_time_s"])
        self.data["runs"].append(run)
        self._save()
        print(f"[{task.name}] {variant} lr={lr:g} seed={seed}: {_metrics_line(run)}  "
              f"({run['trainable_parameters']:,} params, {run['tokens_per_second']:,.0f} tok/s, "
              f"{run['wall_time_s']:.1f} s)", flush=True)
        return run

    def task(self, name: str) -> None:
        task = Task(name, self.opts, self.work)
        self.data["tasks"][name] = task.describe()
        self._save()
        self.zero_shot(task)
        for variant in self.opts.methods:
            for lr in self.opts.lrs:
                self.ensure(task, variant, lr, self.opts.selection_seed, need_test=False)
        for variant in self.opts.methods:
            best = select_lr(self.data, name, variant, self.opts.lrs)
            if best is None:
                print(f"[{name}] {variant}: every learning rate diverged; no test runs", flush=True)
                continue
            for seed in self.opts.seeds:
                self.ensure(task, variant, best, seed, need_test=True)


def _metrics_line(record: dict) -> str:
    keys = ("valid_accuracy", "test_accuracy", "valid_loss", "test_loss")
    return "  ".join(f"{k} {record[k]:.4f}" for k in keys if record.get(k) is not None)


ENV_SHOWN = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS", "SMOA_MLX_KERNEL", "SMOA_MLX_GGUF", "CUDA_VISIBLE_DEVICES")


def _invocation(argv: list[str]) -> dict[str, Any]:
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV_SHOWN if os.environ.get(k))
    return {
        "command": (env + " " if env else "") + "python scripts/compare.py " + shlex.join(argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(mx.default_device()), "mlx": mx.__version__, "platform": platform.platform(),
        "machine": platform.machine(), "processor": platform.processor(),
    }


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    try:
        check_options(opts)
        out = Path(opts.out)
        work = Path(opts.work) if opts.work else out.with_name(out.stem + "-work")
        data = load_results(out, protocol(opts), opts.model or EMBEDDED_NAME)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    invocation = _invocation(argv)
    invocation["label"] = opts.label
    data["invocations"].append(invocation)
    if opts.cache_model and opts.model is None:
        opts.load_from = cache_embedded(Path(opts.cache_model))
        invocation["model_folder"] = opts.load_from
    grid = Grid(opts, out, work, data)
    stopped = None
    try:
        with cached_orders():  # the spectral orders of W0 are the same in every SMoA/HiRA run
            for name in opts.tasks:
                try:
                    grid.task(name)
                except FileNotFoundError as e:  # e.g. no packaged training set yet: the other tasks still run
                    print(f"skipped task {name}: {e}", file=sys.stderr, flush=True)
                    invocation.setdefault("skipped", {})[name] = str(e)
    except BudgetReached as e:
        stopped = str(e)
        print(f"stopped: {stopped}", flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        stopped = f"error: {e}"
    invocation["wall_time_s"] = time.monotonic() - grid.start
    invocation["stopped"] = stopped
    save_results(out, data)
    if opts.doc:
        doc = Path(opts.doc)
        plot = Path(opts.plot) if opts.plot else doc.with_suffix(".png")
        write_report(data, doc, plot)
        print(f"wrote {doc} and {plot}")
    print(f"results: {out} ({len(data['runs'])} runs)")
    return 1 if stopped and stopped.startswith("error") else 0


if __name__ == "__main__":
    sys.exit(main())
