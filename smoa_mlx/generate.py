"""``python -m smoa_mlx.generate --prompt ...``: one reply, streamed, from a fused model or base + adapter.

The prompt goes through the tokenizer's chat template as a single user turn (with ``--system-prompt`` if
given), as ``mlx_lm.generate`` does; ``--raw-prompt`` feeds the text as is (base models, completions).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mlx_lm.generate import stream_generate

from . import cli
from .conversation import Conversation, TurnStats, stream_to


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.generate",
        description="Generate one reply from a fused model, or from a base model and its adapter (not fused).",
    )
    cli.add_model_args(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the user message ('-' reads it from stdin)")
    parser.add_argument(
        "--raw-prompt", "--ignore-chat-template", action="store_true",
        help="feed the prompt as plain text, without the chat template (--ignore-chat-template: mlx-lm's name)",
    )
    cli.add_generation_args(parser)
    return cli.show_defaults(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_generation_args(parser, args)
    if args.raw_prompt and args.system_prompt is not None:
        parser.error("--system-prompt needs the chat template; drop --raw-prompt")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    print(f"Loading {cli.model_label(args)}", file=sys.stderr)
    model, tokenizer = cli.load_from_args(args)
    sampler = cli.sampler_from_args(args)
    if args.raw_prompt:
        tokens = tokenizer.encode(prompt)
        last = stream_to(stream_generate(model, tokenizer, tokens, max_tokens=args.max_tokens, sampler=sampler), sys.stdout)
        stats = TurnStats.of(last, prompt_tokens=len(tokens), new_tokens=len(tokens))
    else:
        conversation = Conversation(model, tokenizer, system_prompt=args.system_prompt)
        stream_to(conversation.reply(prompt, max_tokens=args.max_tokens, sampler=sampler), sys.stdout)
        stats = conversation.last_stats
    print(stats.line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "smoa_mlx.generate"))
