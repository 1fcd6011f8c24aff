"""Command line and YAML options of ``python -m smoa_mlx.train``: mlx_lm.lora's names plus SMoA's own.

Precedence: command line, then the YAML file (``-c``, read with mlx-lm's own YAML loader, so ``1e-5`` is a
number as in ``mlx_lm.lora``), then defaults (mlx-lm's where the reference runs do not say otherwise); unknown
flags and unknown YAML keys are errors (a typo must not silently train with a default). Each method gets its own
default learning rate. Every value is checked before anything is loaded; SMoA's hyperparameters by
:func:`smoa_mlx.config.check_smoa_values`, the one place that checks them.
"""

from __future__ import annotations

import argparse
import math
import re
import types
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from mlx_lm.lora import CONFIG_DEFAULTS as MLX_LM_DEFAULTS
from mlx_lm.lora import yaml_loader

from ..cli import show_defaults
from ..config import DEFAULT_TARGETS, check_smoa_values
from ..errors import OptionError
from .methods import DEFAULT_LEARNING_RATES, METHODS

OPTIMIZERS = tuple(MLX_LM_DEFAULTS["optimizer_config"])  # mlx_lm.lora's choices
SMOA_KEYS = ("rank", "blocks", "alpha", "dropout", "branch_ranks", "target_modules", "num_layers")

# mlx_lm.lora's own defaults, for every option that means the same here.
_FROM_MLX_LM = ("train", "test", "lr_schedule", "mask_prompt", "batch_size", "val_batches", "test_batches",
                "steps_per_report", "save_every", "adapter_path", "max_seq_length", "grad_checkpoint", "seed", "config",
                "grad_accumulation_steps", "report_to", "project_name")
DEFAULTS: dict[str, Any] = {
    **{key: MLX_LM_DEFAULTS[key] for key in _FROM_MLX_LM},
    # Where this package differs from mlx_lm.lora. The reference runs: K=2, alpha = rank (scale 1), AdamW with
    # no weight decay, warmup 100 steps, targets q,k,v,up,down in every block. Steps and evaluation cadence are
    # sized for the packaged demo set (a few minutes on a laptop's GPU; CPU_DEFAULTS on a CPU). Dropout stays
    # mlx_lm.lora's (and PEFT's) 0, not the reference runs' 0.05 (--dropout 0.05): with dropout the update sees
    # another input than the base and cannot be merged into its matmul (kernels/merged.py): at the embedded model's
    # shape on a CPU that cost SMoA 15% of its tokens/s (LoRA 6%) and 13% more peak memory (docs/BENCHMARKS.md).
    "model": None,  # None: the embedded SmolLM2-135M-Instruct
    "data": None,  # None: the training set shipped in smoa_mlx/data
    "fine_tune_type": "smoa",
    "optimizer": "adamw",
    "optimizer_config": {"adamw": {"weight_decay": 0.0}},
    "learning_rate": None,  # None: DEFAULT_LEARNING_RATES[fine_tune_type]
    "warmup": None,  # None: min(100, iters // 10) steps of linear warmup, then cosine decay
    "num_layers": -1,
    "iters": 200,
    "steps_per_eval": 50,
    "resume": False,
    "force": False,
    "rank": 8,
    "blocks": 2,
    "branch_ranks": None,
    "alpha": None,  # None: alpha = rank
    "dropout": 0.0,
    "target_modules": list(DEFAULT_TARGETS),
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


def _on_cpu(key: str) -> str:
    return f" (default: {DEFAULTS[key]}; {CPU_DEFAULTS[key]} on MLX's CPU backend)"


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
    add("--iters", type=int, help="total steps, one batch each (a resumed run continues up to this)" + _on_cpu("iters"))
    add("--val-batches", type=int, help="validation batches per evaluation (-1: the whole valid set)"
        + _on_cpu("val_batches"))
    add("--test-batches", type=int, help="test batches (-1: the whole test set)")
    add("--steps-per-report", type=int, help="steps between training-loss reports" + _on_cpu("steps_per_report"))
    add("--steps-per-eval", type=int, help="steps between validations" + _on_cpu("steps_per_eval"))
    add("--save-every", type=int, help="steps between checkpoints")
    add("--adapter-path", help="folder for the adapter, checkpoints and loss curve (default ./adapters)")
    add("--max-seq-length", type=int, help="longer examples are truncated (with a warning)")
    add("--grad-checkpoint", action="store_true", default=None, help="recompute activations to save memory")
    add("--grad-accumulation-steps", type=int, help="batches whose gradients are summed into one optimizer step "
        "(mlx-lm's flag; --iters, --save-every and --warmup still count batches)")
    add("--report-to", help="also log losses to wandb, swanlab or wandb,swanlab (mlx-lm's reporting callbacks)")
    add("--project-name", help="project name for --report-to")
    add("--seed", type=int, help="seed for initialisation, data order and dropout")
    add("--resume", action="store_true", default=None, help="continue from the checkpoint in --adapter-path")
    add("--force", action="store_true", default=None, help="overwrite an adapter already in --adapter-path")
    add("--rank", type=int, help="total adapter rank r (default 8)")
    add("--blocks", type=int, help="SMoA blocks K (default 2; hira uses 1)")
    add("--branch-ranks", type=_int_list, help="per-block ranks summing to --rank, e.g. 5,3")
    add("--alpha", type=float, help="scale numerator: scale = alpha / rank (default alpha = rank)")
    add("--dropout", type=float, help="dropout on the adapter path (default 0, as mlx_lm.lora; the reference runs "
                                      "used 0.05, which trains slower: the update then runs apart from the base)")
    add("--target-modules", type=_name_list, help="comma-separated module names (default q,k,v,up,down proj)")
    add("--no-preview", dest="preview", action="store_false", default=None,
        help="skip answering one held-out question before and after training")
    add("-c", "--config", help="YAML file with any of these options (underscored names)")
    return show_defaults(p, DEFAULTS)


def load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"-c {file}: no such config file")
    try:
        data = yaml.load(file.read_text(), Loader=yaml_loader) or {}
    except yaml.YAMLError as e:
        raise OptionError(f"{file}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise OptionError(f"{file}: expected a mapping of option names to values")
    unknown = sorted(set(data) - set(DEFAULTS) - {"config"})
    if unknown:
        raise OptionError(f"{file}: unknown config keys {unknown} (known: {sorted(DEFAULTS)})")
    return data


def _fold_lora_parameters(opts: dict[str, Any], explicit: set) -> None:
    """mlx-lm configs give lora_parameters {rank, scale, dropout, keys}; map them unless set directly."""
    lp = opts.pop("lora_parameters", None) or {}
    unknown = sorted(set(lp) - {"rank", "scale", "dropout", "keys"})
    if unknown:
        raise OptionError(f"lora_parameters: unknown keys {unknown} (known: rank, scale, dropout, keys)")
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
                    raise OptionError(f"unknown option {key!r} (known: {', '.join(sorted(DEFAULTS))})")
                opts[key] = value
                explicit.add(key)
    _fold_lora_parameters(opts, explicit)
    from_yaml = set(yaml_data) - {k for k, v in cli.items() if v is not None}

    def name(key: str) -> str:
        """What the user wrote: the flag, or the key of the YAML file it came from."""
        return f"{key} (in {cli.get('config')})" if key in from_yaml else f"--{key.replace('_', '-')}"

    kind = opts["fine_tune_type"]
    if kind not in METHODS:
        raise OptionError(f"{name('fine_tune_type')} must be one of {', '.join(METHODS)}, got {kind!r}")
    if kind == "hira" and "blocks" not in explicit:
        opts["blocks"] = 1
    if kind == "hira" and opts["blocks"] != 1:
        raise OptionError(f"{name('fine_tune_type')} hira is SMoA with one block; got {name('blocks')} {opts['blocks']}")
    if isinstance(opts["target_modules"], str):
        opts["target_modules"] = _name_list(opts["target_modules"])
    check_smoa_values({k: opts[k] for k in SMOA_KEYS}, name)
    if opts["learning_rate"] is None:
        opts["learning_rate"] = DEFAULT_LEARNING_RATES[kind]
    if opts["warmup"] is None:
        opts["warmup"] = min(100, opts["iters"] // 10)
    if not opts["train"] and not opts["test"]:
        opts["train"] = True
    for key in ("iters", "batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length"):
        if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
            raise OptionError(f"{name(key)} must be a positive integer, got {opts[key]!r}")
    if not isinstance(opts["warmup"], int) or not 0 <= opts["warmup"] <= opts["iters"]:
        raise OptionError(f"{name('warmup')} must be between 0 and --iters ({opts['iters']}), got {opts['warmup']!r}")
    lr = opts["learning_rate"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr < 0:
        raise OptionError(f"{name('learning_rate')} must be a finite number >= 0, got {lr!r}")
    accumulate = opts["grad_accumulation_steps"]
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise OptionError(f"{name('grad_accumulation_steps')} must be a positive integer, got {accumulate!r}")
    for key in ("iters", "save_every"):  # checkpoints and the end must fall where an optimizer step was just taken
        if opts[key] % accumulate and not (key == "save_every" and opts[key] > opts["iters"]):
            raise OptionError(f"{name(key)} {opts[key]} must be a multiple of {name('grad_accumulation_steps')} "
                              f"{accumulate}")
    check_report_to(opts["report_to"], name("report_to"))
    if opts["max_seq_length"] < 2:  # a 1-token window leaves nothing to predict: mlx-lm fails reshaping it
        raise OptionError(f"{name('max_seq_length')} must be at least 2 (an input and the token it predicts), "
                          f"got {opts['max_seq_length']}")
    if opts["optimizer"] not in OPTIMIZERS:
        raise OptionError(f"{name('optimizer')} must be one of {', '.join(OPTIMIZERS)}, got {opts['optimizer']!r}")
    return types.SimpleNamespace(**opts)


def check_report_to(report_to: Optional[str], flag: str) -> None:
    """Every service named is one mlx-lm can report to and is installed, before any model is loaded."""
    import importlib.util

    from mlx_lm.tuner.callbacks import SUPPORT_CALLBACK

    if report_to is None:
        return
    if not isinstance(report_to, str):
        raise OptionError(f"{flag} must be a comma-separated list of services, got {report_to!r}")
    for service in (s.strip().lower() for s in report_to.split(",") if s.strip()):
        if service not in SUPPORT_CALLBACK:
            raise OptionError(f"{flag}: unknown service {service!r} (known: {', '.join(SUPPORT_CALLBACK)})")
        if service in ("wandb", "swanlab") and importlib.util.find_spec(service) is None:
            raise OptionError(f"{flag} {service}: the {service} package is not installed (pip install {service})")


def parse_args(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Options from a command line (``sys.argv[1:]`` when None); argparse exits on unknown flags."""
    ns = vars(build_parser().parse_args(argv))
    yaml_data = load_yaml(ns["config"]) if ns.get("config") else None
    return resolve(ns, yaml_data)
