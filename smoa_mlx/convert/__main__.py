"""``python -m smoa_mlx.convert <direction> ADAPTER OUT [--base MODEL] [--model-type TYPE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.nn as nn

from ..adapters.folder import read_adapter, recorded_base
from ..atomic import recover_folder
from ..errors import OptionError, SMoAError
from ..folder_lock import FolderLock
from ..loading import EMBEDDED, HUB_ID, fetch_from_hub
from .common import distinct
from .peft_hira import hira_to_smoa, smoa_to_hira
from .peft_lora import mlx_lora_to_peft, peft_lora_to_mlx
from .reference_smoa import reference_to_smoa, smoa_to_reference

# direction -> (function, needs the base model, help)
DIRECTIONS: dict[str, tuple[Callable, bool, str]] = {
    "to-reference": (smoa_to_reference, True, "SMoA adapter -> reference SMoA PyTorch format (misonsky/SMoA)"),
    "from-reference": (reference_to_smoa, True, "reference SMoA PyTorch adapter -> SMoA adapter"),
    "to-hira": (smoa_to_hira, False, "SMoA adapter -> stock PEFT HiRA (lossless)"),
    "from-hira": (hira_to_smoa, False, "stock PEFT HiRA adapter -> SMoA adapter with one block"),
    "to-peft": (mlx_lora_to_peft, False, "mlx-lm LoRA/DoRA adapter -> PEFT LoRA/DoRA"),
    "from-peft": (peft_lora_to_mlx, False, "PEFT LoRA/DoRA adapter -> mlx-lm LoRA/DoRA"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.convert",
        description="Convert adapters between smoa-mlx / mlx-lm and PyTorch (reference SMoA, PEFT HiRA/LoRA/DoRA).",
    )
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for name, (_, needs_base, text) in DIRECTIONS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("adapter", type=Path, help="input adapter folder")
        p.add_argument("out", type=Path, help="output adapter folder (created; files in it are replaced atomically)")
        p.add_argument(
            "--base",
            required=needs_base,
            help="base model folder, Hugging Face repo (MLX or transformers format) or 'embedded': checks shapes and "
            "the base fingerprint" + ("; the reference's groups are recomputed from it" if needs_base else "")
            + " (default: the base the adapter records, when it is local)",
        )
        p.add_argument("--model-type", help="llama, qwen2, phi3, ... (default: read from --base)")
        p.add_argument("--force", action="store_true", help="replace the adapter in an output folder that holds one")
        if "reference" in name:
            p.add_argument(
                "--order",
                choices=("svd32", "gram"),
                default="svd32",
                help="recompute the reference's ordering with its float32 SVD (default, exact on CPU) or the "
                "float64 Gram method (much faster on big layers; differs only at near-tied scores)",
            )
    return parser


def load_base(name: str, hint: str = "") -> nn.Module:
    """The base model through mlx-lm (lazily: only the adapted layers' weights are ever read); ``embedded`` is the
    embedded SmolLM2-135M-Instruct, which needs no download."""
    from mlx_lm.utils import load_model

    if name == EMBEDDED:
        from ..loading import load_model as load_embedded_or_folder

        return load_embedded_or_folder(None)[0]
    path = Path(name)
    recover_folder(path)  # a model folder whose replacement was killed midway: put the previous one back
    if not path.exists():
        if not HUB_ID.match(name):
            raise FileNotFoundError(f"--base {name}: no such folder, and not a Hugging Face id ('owner/name')")
        from huggingface_hub import snapshot_download

        path = fetch_from_hub(snapshot_download, name, "--base", hint, allow_patterns=["*.json", "*.safetensors"])
    model, _ = load_model(path, lazy=True)
    return model


def recorded_base_name(args: argparse.Namespace) -> Optional[str]:
    """The base an smoa-mlx / mlx-lm input adapter records (``embedded`` for the embedded model); None for the
    PEFT inputs of the from-* directions, whose folders record no base this package can load."""
    if not args.direction.startswith("to-"):
        return None
    return recorded_base(read_adapter(args.adapter)) or EMBEDDED  # a bad folder fails here, naming its file


def _base_hint(args: argparse.Namespace, needs_base: bool) -> str:
    """What to pass instead of an unreachable hub id: a local folder always; the embedded model or --model-type
    when the adapter records the embedded model; --model-type alone when the direction needs no base."""
    recorded = recorded_base_name(args)
    if recorded == EMBEDDED:
        hint = ", or --base embedded: this adapter was trained on the embedded SmolLM2-135M-Instruct"
        return hint + ("" if needs_base else " (a llama: --model-type llama converts without any base)")
    return "" if needs_base else ", or only --model-type (llama, qwen2, ...) to convert without checking a base"


def _base_and_type(args: argparse.Namespace, needs_base: bool):
    """(base model or None, model type or None) from --base / --model-type, else from what the adapter records."""
    name = args.base
    if name is None and args.model_type is None:
        recorded = recorded_base_name(args)
        if recorded == EMBEDDED or (recorded and Path(recorded).is_dir()):
            name = recorded  # local: use it, for the shape and fingerprint checks as well
            print(f"--base: using the adapter's recorded base {recorded}", file=sys.stderr)
        else:
            raise OptionError(
                f"{args.adapter}: give --base (the base model folder or Hugging Face id) or --model-type (llama, "
                "qwen2, ...)" + ("" if recorded is None else f": the base it records, {recorded}, is not a local folder")
            )
    base = load_base(name, _base_hint(args, needs_base)) if name else None
    found = getattr(base, "model_type", None) or getattr(getattr(base, "args", None), "model_type", None)
    if args.model_type and found and args.model_type != found:
        raise OptionError(f"--model-type {args.model_type} given, but --base {name} is a {found!r} model")
    return base, args.model_type


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    fn, needs_base, _ = DIRECTIONS[args.direction]
    try:
        # One writer per output folder, held before anything is read, as training holds its --adapter-path.
        with FolderLock(args.out, "output folder") as lock:
            if lock.note:
                print(lock.note, file=sys.stderr)
            distinct(args.adapter, args.out, args.force)  # before the base model loads (the converter checks again)
            base, model_type = _base_and_type(args, needs_base)
            extra = {"order": args.order} if hasattr(args, "order") else {}
            out = fn(args.adapter, args.out, base=base, model_type=model_type, force=args.force, **extra)
    except (SMoAError, ValueError, FileNotFoundError) as e:  # every named error, and mlx-lm's for a bad --base
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
