"""``python -m smoa_mlx.chat``: a streaming chat REPL on a fused model, or on a base model with its adapter live.

Interactive on a terminal (line editing through ``input``); from a pipe it reads one user turn per line and
writes one reply per turn to stdout, so conversations can be scripted and tested. Timing and token counts go
to stderr. Commands: ``/reset`` starts the conversation afresh, ``/quit`` (or end of input) leaves, ``/help``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterator, Optional, Sequence, TextIO

from . import cli
from .conversation import Conversation, stream_to

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/quit": "leave (so do /exit and end of input, Ctrl-D)",
    "/help": "show these commands",
}
QUIT = ("/quit", "/exit")


def _terminal_lines(prompt: str) -> Iterator[str]:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return


def _help() -> str:
    return "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())


def chat_loop(
    conversation: Conversation,
    lines: Iterator[str],
    out: TextIO,
    info: TextIO,
    max_tokens: int,
    sampler: Callable,
) -> int:
    """Answer each line as a user turn until ``/quit`` or the end of ``lines``; returns the number of replies."""
    replies = 0
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        command = line.split()[0].lower() if line.startswith("/") else None
        if command in QUIT:
            break
        if command == "/reset":
            conversation.reset()
            print("[conversation reset]", file=info, flush=True)
            continue
        if command == "/help":
            print(_help(), file=info, flush=True)
            continue
        if command is not None:
            print(f"unknown command {command}; commands:\n{_help()}", file=info, flush=True)
            continue
        try:
            stream_to(conversation.reply(line, max_tokens=max_tokens, sampler=sampler), out)
        except KeyboardInterrupt:
            print("\n[reply interrupted]", file=info, flush=True)
            continue
        replies += 1
        print(conversation.last_stats.line(), file=info, flush=True)
    return replies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m smoa_mlx.chat",
        description="Chat with a fused model, or with a base model and its adapter (layers live, not fused). "
        "Reads one user turn per line from a pipe.",
    )
    cli.add_model_args(parser)
    cli.add_generation_args(parser)
    return cli.show_defaults(parser)


def main(argv: Optional[Sequence[str]] = None, stdin: TextIO = None, stdout: TextIO = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_generation_args(parser, args)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    print(f"Loading {cli.model_label(args)}", file=sys.stderr)
    model, tokenizer = cli.load_from_args(args)
    conversation = Conversation(model, tokenizer, system_prompt=args.system_prompt)
    if interactive:
        print(f"Chatting with {cli.model_label(args)}. Commands:\n{_help()}", file=sys.stderr)
        lines = _terminal_lines(">> ")
    else:
        lines = iter(stdin)
    try:
        chat_loop(conversation, lines, stdout, sys.stderr, args.max_tokens, cli.sampler_from_args(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, "smoa_mlx.chat"))
