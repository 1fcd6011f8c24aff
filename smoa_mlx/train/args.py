"""Command line and YAML options of ``python -m smoa_mlx.train``: mlx_lm.lora's names plus SMoA's own.

Precedence: command line, then the YAML file (``-c``), then defaults; unknown flags and unknown YAML keys are
errors (a typo must not silently train with a default). Each method gets its own default learning rate.
"""

from __future__ import annotations

import argparse
import re
import types
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..config import DEFAULT_TARGETS
from .methods import DEFAULT_LEARNING_RATES, METHODS

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "muon")

# Reference runs: K=2, alpha = rank (scale 1), AdamW, warmup 100 steps, dropout 0.05, targets q,k,v,up,down.
# Steps and evaluation cadence are sized for the packaged demo set (a few minutes on a laptop's GPU).
DEFAULTS: dict[str, Any] = {
    "model": None,  # None: the embedded SmolLM2-135M-Instruct
    "data": None,  # None: the training set shipped in smoa_mlx/data
    "train": False,
    "test": False,
    "fine_tune_type": "smoa",
    "optimizer": "adamw",
    "optimizer_config": {"adamw": {"weight_decay": 0.0}},
    "lr_schedule": None,
    "learning_rate": None,  # None: DEFAULT_LEARNING_RATES[fine_tune_type]
    "warmup": None,  # None: min(100, iters // 10) steps of linear warmup, then cosine decay
    "mask_prompt": False,
    "num_layers": -1,
    "batch_size": 4,
    "iters": 200,
    "val_batches": 25,
    "test_batches": 500,
    "steps_per_report": 10,
    "steps_per_eval": 50,
    "save_every": 100,
    "adapter_path": "adapters",
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "seed": 0,
    "resume": False,
    "force": False,
    "rank": 8,
    "blocks": 2,
    "branch_ranks": None,
    "alpha": None,  # None: alpha = rank
    "dropout": 0.05,
    "target_modules": list(DEFAULT_TARGETS),
    "config": None,
    "lora_parameters": None,  # mlx-lm YAML compatibility: {rank, scale, dropout, keys}
    "preview": True,  # answer one held-out question before and after training
}

# Where MLX computes on the CPU (Linux without CUDA, CI), a step of the demo takes seconds on 2 cores: the
# no-flags run there is cut to what finishes in a few minutes and still shows the adapter learning.
CPU_DEFAULTS: dict[str, Any] = {"iters": 20, "steps_per_eval": 10, "val_batches": 2, "steps_per_report": 5}


def backend() -> str:
    """``"cpu"`` when MLX's default device is the CPU, else ``"gpu"`` (Apple or NVIDIA)."""
    import mlx.core as mx

    return "cpu" if mx.default_device().type == mx.DeviceType.cpu else "gpu"


def defaults(on: Optional[str] = None) -> dict[str, Any]:
    """The option defaults for a backend (``"cpu"``/``"gpu"``; None: this machine's)."""
    return {**DEFAULTS, **(CPU_DEFAULTS if (on or backend()) == "cpu" else {})}


def schedule_note(opts: types.SimpleNamespace, on: Optional[str] = None) -> str:
    """The run's first line: the backend and the length of the run, and whether that is the CPU's shorter
    default, so nobody mistakes the 20-step CPU demo for the full one."""
    on = on or backend()
    batches = "all" if opts.val_batches == -1 else opts.val_batches
    line = (f"MLX {on.upper()} backend: {opts.iters} steps, validation on {batches} batches "
            f"every {opts.steps_per_eval} steps")
    if on == "cpu" and all(getattr(opts, k) == v for k, v in CPU_DEFAULTS.items()):
        full = ", ".join(f"--{k.replace('_', '-')} {DEFAULTS[k]}" for k in CPU_DEFAULTS)
        line += f" (the CPU defaults, to finish in minutes; a GPU runs {full})"
    return line


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [v for v in re.split(r"[,\s]+", text.strip()) if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smoa_mlx.train",
        description="Fine-tune a language model with SMoA (or HiRA / LoRA / DoRA) on mlx-lm's training loop. "
        "With no flags: SMoA on the embedded SmolLM2-135M-Instruct with the packaged demo data.",
    )
    add = p.add_argument
    add("--model", help="local model folder or Hugging Face repo (default: embedded SmolLM2-135M-Instruct)")
    add("--data", help="folder with train/valid/test.jsonl, or a Hugging Face dataset id (default: packaged demo)")
    add("--train", action="store_true", default=None, help="train (the default unless only --test is given)")
    add("--test", action="store_true", default=None, help="evaluate on test.jsonl after training")
    add("--fine-tune-type", choices=METHODS, help="smoa (default), hira (= smoa with 1 block), lora or dora")
    add("--optimizer", choices=OPTIMIZERS, help="default adamw (weight decay 0)")
    add("--learning-rate", type=float, help=f"peak learning rate (default per method: {DEFAULT_LEARNING_RATES})")
    add("--warmup", type=int, help="linear warmup steps before cosine decay (default min(100, iters/10))")
    add("--mask-prompt", action="store_true", default=None, help="no loss on prompt tokens (chat/completions)")
    add("--num-layers", type=int, help="adapt the last N transformer blocks (-1: all, the default)")
    add("--batch-size", type=int, help="global batch size (split across data-parallel ranks)")
    add("--iters", type=int, help="total optimizer steps (a resumed run continues up to this; default 200, "
        f"{CPU_DEFAULTS['iters']} on MLX's CPU backend)")
    add("--val-batches", type=int, help="validation batches per evaluation (-1: the whole valid set; default 25, "
        f"{CPU_DEFAULTS['val_batches']} on the CPU)")
    add("--test-batches", type=int, help="test batches (-1: the whole test set)")
    add("--steps-per-report", type=int, help="steps between training-loss reports (default 10, "
        f"{CPU_DEFAULTS['steps_per_report']} on the CPU)")
    add("--steps-per-eval", type=int, help=f"steps between validations (default 50, {CPU_DEFAULTS['steps_per_eval']} "
        "on the CPU)")
    add("--save-every", type=int, help="steps between checkpoints")
    add("--adapter-path", help="folder for the adapter, checkpoints and loss curve (default ./adapters)")
    add("--max-seq-length", type=int, help="longer examples are truncated (with a warning)")
    add("--grad-checkpoint", action="store_true", default=None, help="recompute activations to save memory")
    add("--seed", type=int, help="seed for initialisation, data order and dropout")
    add("--resume", action="store_true", default=None, help="continue from the checkpoint in --adapter-path")
    add("--force", action="store_true", default=None, help="overwrite an adapter already in --adapter-path")
    add("--rank", type=int, help="total adapter rank r (default 8)")
    add("--blocks", type=int, help="SMoA blocks K (default 2; hira uses 1)")
    add("--branch-ranks", type=_int_list, help="per-block ranks summing to --rank, e.g. 5,3")
    add("--alpha", type=float, help="scale numerator: scale = alpha / rank (default alpha = rank)")
    add("--dropout", type=float, help="dropout on the adapter path (default 0.05)")
    add("--target-modules", type=_name_list, help="comma-separated module names (default q,k,v,up,down proj)")
    add("--no-preview", dest="preview", action="store_false", default=None,
        help="skip answering one held-out question before and after training")
    add("-c", "--config", help="YAML file with any of these options (underscored names)")
    return p


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"-c {file}: no such config file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{file}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping of option names to values")
    unknown = sorted(set(data) - set(DEFAULTS) - {"config"})
    if unknown:
        raise ValueError(f"{file}: unknown config keys {unknown} (known: {sorted(DEFAULTS)})")
    for key in ("learning_rate", "alpha", "dropout"):  # YAML reads 1e-3 as a string
        if isinstance(data.get(key), str):
            try:
                data[key] = float(data[key])
            except ValueError:
                raise ValueError(f"{file}: {key} must be a number, got {data[key]!r}") from None
    return data


def _fold_lora_parameters(opts: dict[str, Any], explicit: set) -> None:
    """mlx-lm configs give lora_parameters {rank, scale, dropout, keys}; map them unless set directly."""
    lp = opts.pop("lora_parameters", None) or {}
    unknown = sorted(set(lp) - {"rank", "scale", "dropout", "keys"})
    if unknown:
        raise ValueError(f"lora_parameters: unknown keys {unknown} (known: rank, scale, dropout, keys)")
    if "rank" in lp and "rank" not in explicit:
        opts["rank"] = int(lp["rank"])
    if "dropout" in lp and "dropout" not in explicit:
        opts["dropout"] = float(lp["dropout"])
    if "keys" in lp and "target_modules" not in explicit:
        opts["target_modules"] = list(lp["keys"])
    if "scale" in lp and "alpha" not in explicit:
        opts["alpha"] = float(lp["scale"]) * opts["rank"]


def resolve(
    cli: dict[str, Any], yaml_data: Optional[dict[str, Any]] = None, on: Optional[str] = None
) -> types.SimpleNamespace:
    """Merge command line (None = not given), YAML and defaults (those of backend ``on``, default this
    machine's); fill the derived defaults; check values."""
    yaml_data = dict(yaml_data or {})
    opts = defaults(on)
    explicit = set()
    for source in (yaml_data, cli):
        for key, value in source.items():
            if value is not None:
                if key not in DEFAULTS:
                    raise ValueError(f"unknown option {key!r}")
                opts[key] = value
                explicit.add(key)
    _fold_lora_parameters(opts, explicit)
    kind = opts["fine_tune_type"]
    if kind == "hira" and "blocks" not in explicit:
        opts["blocks"] = 1
    if opts["learning_rate"] is None:
        opts["learning_rate"] = DEFAULT_LEARNING_RATES[kind]
    if opts["warmup"] is None:
        opts["warmup"] = min(100, opts["iters"] // 10)
    if not opts["train"] and not opts["test"]:
        opts["train"] = True
    for key in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length",
                "rank", "blocks"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer, got {opts[key]!r}")
    if opts["warmup"] < 0 or opts["warmup"] > opts["iters"]:
        raise ValueError(f"--warmup must be between 0 and --iters ({opts['iters']}), got {opts['warmup']}")
    if opts["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {opts['optimizer']!r}")
    if isinstance(opts["target_modules"], str):
        opts["target_modules"] = _name_list(opts["target_modules"])
    return types.SimpleNamespace(**opts)


def parse_args(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Options from a command line (``sys.argv[1:]`` when None); argparse exits on unknown flags."""
    ns = vars(build_parser().parse_args(argv))
    yaml_data = load_yaml(ns["config"]) if ns.get("config") else None
    return resolve(ns, yaml_data)
