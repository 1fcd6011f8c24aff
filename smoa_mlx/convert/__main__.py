"""``python -m smoa_mlx.convert <direction> ADAPTER OUT [--base MODEL] [--model-type TYPE]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import SMoAError
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
            help="base model folder or Hugging Face repo (MLX or transformers format): checks shapes and the "
            "base fingerprint" + ("; the reference's groups are recomputed from it" if needs_base else ""),
        )
        p.add_argument("--model-type", help="llama, qwen2, phi3, ... (read from --base when given)")
        if "reference" in name:
            p.add_argument(
                "--order",
                choices=("svd32", "gram"),
                default="svd32",
                help="recompute the reference's ordering with its float32 SVD (default, exact on CPU) or the "
                "float64 Gram method (much faster on big layers; differs only at near-tied scores)",
            )
    return parser


def load_base(name: str):
    """The base model through mlx-lm (lazily: only the adapted layers' weights are ever read)."""
    from mlx_lm.utils import load_model

    path = Path(name)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    model, _ = load_model(path, lazy=True)
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    fn, _, _ = DIRECTIONS[args.direction]
    try:
        base = load_base(args.base) if args.base else None
        extra = {"order": args.order} if hasattr(args, "order") else {}
        out = fn(args.adapter, args.out, base=base, model_type=args.model_type, **extra)
    except (SMoAError, ValueError, FileNotFoundError) as e:  # every named error, and mlx-lm's for a bad --base
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
