"""``python -m smoa_mlx.fuse``: merge an adapter into its base model and save a plain mlx-lm model folder.

The folder (config.json, model.safetensors, tokenizer files) has no adapter layers left, so stock
``mlx_lm.generate`` / ``mlx_lm.chat`` / ``mlx_lm.load`` use it at the base model's speed. SMoA/HiRA layers merge
through ``SMoALinear.fuse``, mlx-lm LoRA/DoRA layers through their own ``fuse``: every layer that can fuse itself.

Dequantized by default: re-quantizing a fused model can round a small update away entirely (mlx-lm #1172), so
``--quantize`` measures, per adapted layer, how much of the update the quantization drops, and warns.
The folder is written to a temporary sibling and renamed into place (``models.folder.save_model_folder``); an
existing folder is replaced only with ``--force``, and never when it is the model or adapter being read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model, quantize_model

from .cli import add_model_args, load_from_args, model_label, run
from .convert.hf_export import export_hf, fuse_adapters
from .loading import read_adapter_kind
from .models.folder import save_model_folder
from .quant_check import quantization_report

_QUANT_KEYS = ("quantization", "quantization_config")
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 64


class SavePathExistsError(FileExistsError):
    """The output folder exists and ``--force`` was not given."""


def adapter_layer_paths(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if callable(getattr(m, "fuse", None))]


def check_save_path(path: os.PathLike, force: bool, flag: str, protected: Sequence[Optional[str]] = ()) -> Path:
    """Refuse an output folder that exists (unless ``force``) or that holds the model / adapter being read."""
    path = Path(path)
    target = path.resolve()
    for source in protected:
        if source and Path(source).exists():
            src = Path(source).resolve()
            if target == src or target in src.parents:
                raise ValueError(f"{flag} {path} would overwrite {source}, which this command reads")
    if path.exists():
        if not path.is_dir():
            raise SavePathExistsError(f"{flag} {path} exists and is not a folder")
        if not force:
            raise SavePathExistsError(f"{flag} {path} already exists; pass --force to replace it")
    return path


def merge_dense(model: nn.Module, config: dict) -> dict:
    """Merge every adapter layer into its base and dequantize the whole model, in place; returns its config."""
    fuse_adapters(model)
    dequantize_model(model)
    mx.eval(model.parameters())
    return {k: v for k, v in config.items() if k not in _QUANT_KEYS}


def _quant_defaults(config: dict) -> tuple[int, int]:
    """Re-quantize as the base was quantized, unless told otherwise; mlx-lm's defaults for a dense base."""
    q = config.get("quantization") or {}
    return int(q.get("bits", DEFAULT_BITS)), int(q.get("group_size", DEFAULT_GROUP_SIZE))


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
        "--q-bits", type=int, choices=(2, 3, 4, 5, 6, 8), default=None,
        help="bits for --quantize (default: the base's, else 4)",
    )
    parser.add_argument(
        "--q-group-size", type=int, choices=(32, 64, 128), default=None,
        help="group size for --quantize (default: the base's, else 64)",
    )
    parser.add_argument(
        "--export-hf", action="store_true",
        help="also write a Hugging Face transformers checkpoint (dense safetensors) of the fused model",
    )
    parser.add_argument("--hf-path", default=None, help="folder for --export-hf (default: <save-path>-hf)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.q_bits is not None or args.q_group_size is not None) and not args.quantize:
        parser.error("--q-bits / --q-group-size need --quantize")
    if args.hf_path is not None and not args.export_hf:
        parser.error("--hf-path needs --export-hf")
    kind, adapter_config = read_adapter_kind(args.adapter_path)  # a bad adapter fails before the slow model load
    protected = (args.model or adapter_config.get("model"), args.adapter_path)
    save_path = check_save_path(args.save_path, args.force, "--save-path", protected)
    hf_path = None
    if args.export_hf:
        hf_path = check_save_path(args.hf_path or f"{save_path}-hf", args.force, "--hf-path", protected)
        if hf_path.resolve() == save_path.resolve():
            parser.error("--hf-path must differ from --save-path")

    print(f"Loading {model_label(args)}", file=sys.stderr)
    model, tokenizer, config = load_from_args(args, return_config=True)
    layers = adapter_layer_paths(model)
    if not layers and kind != "full":  # mlx-lm "full" fine-tunes load as plain weights: nothing left to merge
        raise ValueError(f"--adapter-path {args.adapter_path}: loading it added no adapter layers to fuse")
    quantize = None
    if args.quantize:
        bits, group_size = _quant_defaults(config)
        quantize = (args.q_bits or bits, args.q_group_size or group_size)
    report = quantization_report(model, group_size=quantize[1], bits=quantize[0]) if quantize else None
    config = merge_dense(model, config)
    print(f"Fused {len(layers)} adapter layers", file=sys.stderr)
    if hf_path is not None:
        source = args.model if args.model and Path(args.model).is_dir() else None
        export_hf(model, tokenizer, config, hf_path, src_path=source)
        print(f"Saved Hugging Face checkpoint to {hf_path}")
    if quantize:
        model, config = quantize_model(model, config, group_size=quantize[1], bits=quantize[0])
    save_model_folder(save_path, model, tokenizer, config, force=args.force)
    dtypes = sorted({str(v.dtype).split(".")[-1] for _, v in tree_flatten(model.parameters())})
    kind = f"{quantize[0]}-bit, group size {quantize[1]}" if quantize else "dequantized"
    print(f"Saved fused model to {save_path} ({kind}; {', '.join(dtypes)})")
    if report is not None:
        print(report.summary())
        warning = report.warning()
        if warning:
            print(warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, "smoa_mlx.fuse"))
