"""Options and plumbing shared by ``smoa_mlx.fuse``, ``smoa_mlx.chat`` and ``smoa_mlx.generate``.

One place for the model / adapter / sampling flags, so the three commands accept the same spelling and
defaults (those of ``mlx_lm.generate`` / ``mlx_lm.chat``), and one place that turns the errors users cause
(missing files, an adapter for another model, an existing output folder) into a one-line message and exit
status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import SMoAError
from .loading import describe_model, load_model, load_model_with_adapter

DEFAULT_MAX_TOKENS = 256

# What a user can get wrong (named errors, and the built-in kinds mlx-lm raises for bad input); anything else is
# a bug and keeps its traceback.
USER_ERRORS = (SMoAError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError)


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
    parser.add_argument("--system-prompt", default=None, help="system message for the chat template (default: none)")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per reply")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def check_generation_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temp < 0:
        parser.error(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 <= args.min_p < 1:
        parser.error(f"--min-p must be in [0, 1) (0: off), got {args.min_p}")


def sampler_from_args(args: argparse.Namespace) -> Callable[[mx.array], mx.array]:
    """mlx-lm's own sampler (``make_sampler``), as ``mlx_lm.generate`` builds it from the same flags."""
    mx.random.seed(args.seed)
    return make_sampler(temp=args.temp, top_p=args.top_p, min_p=args.min_p, top_k=args.top_k)


def show_defaults(parser: argparse.ArgumentParser, defaults: Optional[dict] = None) -> argparse.ArgumentParser:
    """Append "(default: X)" to every option's help that does not state its default yet, so ``--help`` shows all.

    ``defaults`` (by dest) overrides the parser's own, for parsers whose argparse defaults are None placeholders
    (train: a YAML file may set what the command line leaves out).
    """
    for action in parser._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS) or action.required:
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        if "default" in action.help or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue
        value = (defaults or {}).get(action.dest, action.default)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        action.help += f" (default: {'none' if value is None else value})".replace("%", "%%")
    return parser


def load_from_args(
    args: argparse.Namespace, return_config: bool = False
) -> Union[tuple[nn.Module, TokenizerWrapper], tuple[nn.Module, TokenizerWrapper, dict[str, Any]]]:
    """(model, tokenizer[, config]) for ``--model`` / ``--adapter-path``, through the project's one loader.

    With an adapter, one line on stderr says which base model was used and whether its fingerprint was checked.
    """
    if args.adapter_path is None:
        return load_model(args.model, return_config=return_config)
    return load_model_with_adapter(args.model, args.adapter_path, log=_stderr, return_config=return_config)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


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


# Console scripts (pyproject.toml), beside ``python -m smoa_mlx.fuse`` etc.
def main_fuse() -> int:
    from .fuse import main

    return run(main, "smoa-fuse")


def main_chat() -> int:
    from .chat import main

    return run(main, "smoa-chat")


def main_generate() -> int:
    from .generate import main

    return run(main, "smoa-generate")


__all__ = [
    "add_generation_args",
    "add_model_args",
    "check_generation_args",
    "load_from_args",
    "model_label",
    "run",
    "sampler_from_args",
    "show_defaults",
]
