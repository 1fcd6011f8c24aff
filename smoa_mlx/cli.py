"""Options and plumbing shared by ``smoa_mlx.fuse``, ``smoa_mlx.chat`` and ``smoa_mlx.generate``.

One place for the model / adapter / sampling flags, so the three commands accept the same spelling and
defaults (those of ``mlx_lm.generate`` / ``mlx_lm.chat``), and one place that turns the errors users cause
(missing files, an adapter for another model, an existing output folder) into a one-line message and exit
status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .loading import describe_model, load_model, load_model_with_adapter

DEFAULT_MAX_TOKENS = 256

# What a user can get wrong; anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError)


def add_model_args(parser: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="mlx-lm model folder or Hugging Face id; default: the base model the adapter records, else the "
        "embedded SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--adapter-path",
        required=adapter_required,
        default=None,
        help="adapter folder (SMoA/HiRA from smoa_mlx.train, or mlx-lm LoRA/DoRA)"
        + ("" if adapter_required else "; without it the model runs as is (e.g. a fused folder)"),
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system-prompt", default=None, help="system message for the chat template")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def check_generation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temp < 0:
        parser.error(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")


def sampler_from_args(args: argparse.Namespace) -> Callable[[mx.array], mx.array]:
    mx.random.seed(args.seed)
    return make_sampler(temp=args.temp, top_p=args.top_p)


def load_from_args(args: argparse.Namespace, return_config: bool = False):
    """(model, tokenizer[, config]) for ``--model`` / ``--adapter-path``, through the project's one loader."""
    if args.adapter_path is None:
        return load_model(args.model, return_config=return_config)
    return load_model_with_adapter(args.model, args.adapter_path, return_config=return_config)


def run(main: Callable[[Optional[Sequence[str]]], int], prog: str, argv: Optional[Sequence[str]] = None) -> int:
    """Run a CLI ``main``, reporting user errors as ``prog: error: message`` with exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def model_label(args: argparse.Namespace) -> str:
    label = describe_model(args.model) if args.model or not args.adapter_path else "the adapter's base model"
    return label + (f" + adapter {args.adapter_path}" if args.adapter_path else "")


__all__ = [
    "add_generation_args",
    "add_model_args",
    "check_generation_args",
    "load_from_args",
    "model_label",
    "run",
    "sampler_from_args",
]
