"""``python -m smoa_mlx.fuse``: merge an adapter into its base model and save a plain mlx-lm model folder.

The folder (config.json, model.safetensors, tokenizer files) has no adapter layers left, so stock
``mlx_lm.generate`` / ``mlx_lm.chat`` / ``mlx_lm.load`` use it at the base model's speed. SMoA/HiRA layers merge
through ``SMoALinear.fuse``, mlx-lm LoRA/DoRA layers through their own ``fuse``: every layer that can fuse itself.

Dequantized by default: re-quantizing a fused model can round a small update away entirely (mlx-lm #1172), so
``--quantize`` measures, per adapted layer, how much of the update the quantization drops, and, on the adapter's
validation data, how much of the adapter's loss improvement the quantized model keeps; it warns on either.
It quantizes as the base was quantized (the embedded model: its GGUF's Q4_1, i.e. 4 bits, group size 32; an mxfp4,
nvfp4 or mxfp8 base in its own mode): another group size or mode re-rounds every base weight, adapted or not.
The folder is written to a temporary sibling and swapped into place (``models.folder.save_model_folder``); an
existing folder is replaced only with ``--force``, and never when it is the model or adapter being read. The output
folders are held with the training run's lock (:mod:`smoa_mlx.folder_lock`), so two commands never write one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, quantize_model

from .cli import add_model_args, load_from_args, model_label, run, show_defaults
from .convert.hf_export import export_hf, fuse_adapters
from .adapters.folder import AdapterFolder, read_adapter, recorded_base
from .errors import SavePathExistsError
from .folder_lock import FolderLock, folder_contents
from .loading import is_embedded
from .models.folder import save_model_folder
from .quant_check import LossCheck, adapters_removed, quantization_report, validation_loss
from .train.data import DataError, check_data, load_splits

_QUANT_KEYS = ("quantization", "quantization_config")
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64  # mlx-lm's, for a dense base
EMBEDDED_QUANTIZATION = (4, 32, "affine")  # the embedded model's GGUF is Q4_1: MLX affine, 4 bits, group size 32
# MLX's quantization modes besides affine, each with its one (bits, group size) (mlx-lm's convert --q-mode).
FIXED_FORMATS = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
Quantization = tuple[int, int, str]  # (bits, group size, mode)
DEFAULT_VAL_BATCHES = 25


def adapter_layer_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if callable(getattr(m, "fuse", None))]


def check_save_path(path: os.PathLike, flag: str, protected: Sequence[Optional[str]] = ()) -> Path:
    """Refuse an output folder that holds the model / adapter being read, or that is a file."""
    path = Path(path)
    target = path.resolve()
    for source in protected:
        if source and Path(source).exists():
            src = Path(source).resolve()
            if target == src or target in src.parents:
                raise ValueError(f"{flag} {path} would overwrite {source}, which this command reads")
    if path.exists() and not path.is_dir():
        raise SavePathExistsError(f"{flag} {path} exists and is not a folder")
    return path


def check_replaceable(path: Path, force: bool, flag: str) -> None:
    """Refuse, unless ``force``, an output folder that holds anything: checked under the folder's lock, which
    this run created if the folder was new."""
    if folder_contents(path) and not force:
        raise SavePathExistsError(f"{flag} {path} already exists; pass --force to replace it")


def merge_dense(model: nn.Module, config: dict) -> dict:
    """Merge every adapter layer into its base and dequantize the whole model, in place; returns its config."""
    fuse_adapters(model)
    dequantize_model(model)
    mx.eval(model.parameters())
    return {k: v for k, v in config.items() if k not in _QUANT_KEYS}


def _base_quantization(config: dict, model: Optional[str]) -> Optional[Quantization]:
    """(bits, group size, mode) of the base as stored, even when it was loaded dequantized (the embedded model's
    GGUF); None for a base that never was quantized."""
    q = config.get("quantization")
    if q:
        mode = q.get("mode", "affine")
        bits, group_size = FIXED_FORMATS.get(mode, (DEFAULT_BITS, DEFAULT_GROUP_SIZE))
        return int(q.get("bits", bits)), int(q.get("group_size", group_size)), mode
    if is_embedded(model):
        return EMBEDDED_QUANTIZATION
    return None


def _quant_defaults(config: dict, model: Optional[str], mode: Optional[str] = None) -> Quantization:
    """(bits, group size, mode) for --quantize: the base's own, so its weights land back on their own grid (in
    ``mode`` when given, the base's only if it has that mode); mlx-lm's defaults otherwise."""
    base = _base_quantization(config, model)
    mode = mode or (base[2] if base else "affine")
    if base and base[2] == mode:
        return base
    return (*FIXED_FORMATS.get(mode, (DEFAULT_BITS, DEFAULT_GROUP_SIZE)), mode)


def _format_error(args: argparse.Namespace, mode: str, whose: str) -> Optional[str]:
    """Why --q-bits / --q-group-size do not fit ``mode`` (mxfp4 / nvfp4 / mxfp8 take one format each), or None."""
    if mode not in FIXED_FORMATS:
        return None
    bits, group_size = FIXED_FORMATS[mode]
    if (args.q_bits or bits, args.q_group_size or group_size) == (bits, group_size):
        return None
    return (f"--q-bits / --q-group-size: {whose} {mode} quantizes at {bits} bits, group size {group_size} only; "
            f"pass --q-mode affine for other bits or group sizes")


def _quantization(args: argparse.Namespace, config: dict, model: Optional[str]) -> Quantization:
    """What --quantize uses: the flags over the defaults (the base's own format)."""
    bits, group_size, mode = _quant_defaults(config, model, args.q_mode)
    error = _format_error(args, mode, "the base's mode")
    if error:
        raise ValueError(error)
    return args.q_bits or bits, args.q_group_size or group_size, mode


def _training_options(adapter_config: dict) -> Optional[dict]:
    """The options the adapter was trained with: smoa_mlx.train records them under ``training``, mlx-lm's
    ``lora`` at the top level (only when it holds ``data``); None when the config does not say."""
    training = adapter_config.get("training")
    if isinstance(training, dict):
        return training
    return adapter_config if "data" in adapter_config else None


def _validation_split(args: argparse.Namespace, adapter_config: dict, tokenizer) -> Optional[tuple]:
    """(tokenized valid split, where, batch size, batches, max length) for the loss check, or None with a note."""
    options = _training_options(adapter_config) or {}
    if args.data is None and _training_options(adapter_config) is None:
        print("Loss check skipped: the adapter does not record its training data; pass --data", file=sys.stderr)
        return None
    data = args.data if args.data is not None else options.get("data")
    batch_size = int(options.get("batch_size") or 4)
    max_seq_length = int(options.get("max_seq_length") or 2048)
    batches = args.val_batches if args.val_batches is not None else int(options.get("val_batches") or DEFAULT_VAL_BATCHES)
    try:
        checked = check_data(data, need=("valid",))
        if checked is not None:
            checked = {"valid": checked["valid"]}  # tokenize only what the check reads
        split = load_splits(data, tokenizer, max_seq_length, batch_size, bool(options.get("mask_prompt")),
                            need=("valid",), warn=lambda m: print(m, file=sys.stderr), checked=checked)["valid"]
    except (DataError, FileNotFoundError) as e:
        print(f"Loss check skipped: {e}", file=sys.stderr)
        return None
    return split, split.name, batch_size, batches, max_seq_length


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.fuse",
        description="Merge an SMoA (or mlx-lm LoRA/DoRA) adapter into its base model; save an mlx-lm model folder.",
    )
    add_model_args(parser, adapter_required=True)
    parser.add_argument("--save-path", default="fused_model", help="output folder (default: fused_model)")
    parser.add_argument("--force", action="store_true", help="replace --save-path / --hf-path if they exist")
    parser.add_argument(
        "-q", "--quantize", action="store_true",
        help="quantize the fused model (default: save it dequantized); reports how much of the update survives",
    )
    parser.add_argument(
        "--dequantize", action=argparse.BooleanOptionalAction, default=None,
        help="mlx-lm's flag: --dequantize saves the fused model dense (what fuse does anyway); --no-dequantize keeps "
        "the base's own quantization (--quantize with the base's bits and group size; a dense base stays dense) "
        "(default: dense)",
    )
    parser.add_argument(
        "--q-bits", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
        help="bits for --quantize (default: the base's, else 4)",
    )
    parser.add_argument(
        "--q-group-size", type=int, choices=(32, 64, 128), default=None,
        help="group size for --quantize (default: the base's, else 64)",
    )
    parser.add_argument(
        "--q-mode", choices=("affine", *FIXED_FORMATS), default=None,
        help="MLX quantization mode for --quantize; mxfp4, nvfp4 and mxfp8 have fixed bits and group size "
        "(default: the base's, else affine)",
    )
    parser.add_argument(
        "--data", default=None,
        help="data folder whose valid.jsonl the --quantize loss check uses (default: the adapter's training data)",
    )
    parser.add_argument(
        "--val-batches", type=int, default=None,
        help=f"batches for the --quantize loss check, -1 for all, 0 to skip it (default: the adapter's training "
        f"setting, else {DEFAULT_VAL_BATCHES})",
    )
    parser.add_argument(
        "--export-hf", action="store_true",
        help="also write a Hugging Face transformers checkpoint (dense safetensors) of the fused model",
    )
    parser.add_argument("--hf-path", default=None, help="folder for --export-hf (default: <save-path>-hf)")
    return show_defaults(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dequantize and args.quantize:
        parser.error("--dequantize and --quantize contradict each other; give one")
    if (args.q_bits is not None or args.q_group_size is not None or args.q_mode is not None) and not args.quantize:
        parser.error("--q-bits / --q-group-size / --q-mode need --quantize")
    format_error = _format_error(args, args.q_mode, "--q-mode") if args.q_mode else None
    if format_error:
        parser.error(format_error)
    if (args.data is not None or args.val_batches is not None) and not args.quantize:
        parser.error("--data / --val-batches are for the --quantize loss check; add --quantize")
    if args.val_batches is not None and args.val_batches < -1:
        parser.error(f"--val-batches must be -1 (all), 0 (skip) or more, got {args.val_batches}")
    if args.hf_path is not None and not args.export_hf:
        parser.error("--hf-path needs --export-hf")
    adapter = read_adapter(args.adapter_path)  # a bad adapter fails before the slow model load
    protected = (args.model or recorded_base(adapter), args.adapter_path)
    outputs = {"--save-path": check_save_path(args.save_path, "--save-path", protected)}
    if args.export_hf:
        hf_path = args.hf_path or f"{args.save_path}-hf"
        outputs["--hf-path"] = check_save_path(hf_path, "--hf-path", protected)
        if outputs["--hf-path"].resolve() == outputs["--save-path"].resolve():
            parser.error("--hf-path must differ from --save-path")
    # One writer per output folder, held before anything is read, as training holds its --adapter-path.
    with contextlib.ExitStack() as held:
        for flag, path in outputs.items():
            lock = held.enter_context(FolderLock(path, flag))
            if lock.note:
                print(lock.note, file=sys.stderr)
            check_replaceable(path, args.force, flag)
        return _fuse(args, adapter, outputs["--save-path"], outputs.get("--hf-path"))


def _fuse(args: argparse.Namespace, adapter: AdapterFolder, save_path: Path, hf_path: Optional[Path]) -> int:
    """Load, merge, (quantize and check,) save: the command once its output folders are checked and held."""
    print(f"Loading {model_label(args)}", file=sys.stderr)
    model, tokenizer, config = load_from_args(args, return_config=True)
    layers = adapter_layer_paths(model)
    if not layers and adapter.kind != "full":  # mlx-lm "full" fine-tunes load as plain weights: nothing left to merge
        raise ValueError(f"--adapter-path {args.adapter_path}: loading it added no adapter layers to fuse")
    quantize, check = None, None
    if args.dequantize is False and not args.quantize:
        args.quantize = _base_quantization(config, args.model or recorded_base(adapter)) is not None
        if not args.quantize:
            print("--no-dequantize: the base is not quantized, so the fused model stays dense", file=sys.stderr)
    if args.quantize:
        quantize = _quantization(args, config, args.model or recorded_base(adapter))
        if args.val_batches != 0:
            check = _validation_split(args, adapter.data, tokenizer)
    report = None
    if quantize:
        report = quantization_report(model, group_size=quantize[1], bits=quantize[0], mode=quantize[2])
    losses = {}
    if check:
        split, _, batch_size, batches, max_seq_length = check
        print(f"Loss check on {split.name}: base and fused model", file=sys.stderr)
        with adapters_removed(model):
            losses["base"] = validation_loss(model, split, batch_size, batches, max_seq_length)
    config = merge_dense(model, config)
    if check:
        losses["fused"] = validation_loss(model, split, batch_size, batches, max_seq_length)
    print(f"Fused {len(layers)} adapter layers", file=sys.stderr)
    if hf_path is not None:
        source = args.model if args.model and Path(args.model).is_dir() else None
        export_hf(model, tokenizer, config, hf_path, src_path=source, force=True)  # checked by check_replaceable
        print(f"Saved Hugging Face checkpoint to {hf_path}")
    if quantize:
        model, config = quantize_model(model, config, group_size=quantize[1], bits=quantize[0], mode=quantize[2])
    save_model_folder(save_path, model, tokenizer, config, force=True)  # check_replaceable refused it if needed
    dtypes = sorted({str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters())})
    kind = "dequantized"
    if quantize:
        bits, group_size, mode = quantize
        kind = ", ".join(([] if mode == "affine" else [mode]) + [f"{bits}-bit", f"group size {group_size}"])
    print(f"Saved fused model to {save_path} ({kind}; {', '.join(dtypes)})")
    if check:
        # The saved quantized model computes with exactly these dequantized weights, and dense is fast everywhere.
        dequantize_model(model)
        losses["quantized"] = validation_loss(model, split, batch_size, batches, max_seq_length)
        check = LossCheck(split.name, quantize[0], quantize[1], **losses, mode=quantize[2])
    for measure in (report, check):
        if measure:
            print(measure.summary())
            warning = measure.warning()
            if warning:
                print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "smoa_mlx.fuse"))
