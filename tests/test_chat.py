"""smoa_mlx.chat driven through a pipe, and smoa_mlx.generate: streamed replies, history kept, /reset, /quit."""

import os
import re
import subprocess
import sys

import mlx_lm
import pytest
from tiny_llm import make_model_folder, make_smoa_adapter

from smoa_mlx import generate
from smoa_mlx.loading import load_model_with_adapter

SYSTEM = "you answer yes no"
U1, U2 = "what is the color of the sky", "is the grass green"
MAX_TOKENS = 6
STATS = re.compile(r"^\[prompt (\d+) tokens \((\d+) new\), (\d+) generated")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    model = make_model_folder(root / "model", seed=7)
    return model, make_smoa_adapter(model, root / "adapter")


def render(tokenizer, *turns):
    """Token ids of system + alternating user/assistant turns, ready for the assistant's next reply."""
    messages = [{"role": "system", "content": SYSTEM}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_chat_through_a_pipe_keeps_the_conversation(tiny):
    model_dir, adapter = tiny
    lines = [U1, "", U2, "/reset", U1, "/quit", "never answered"]
    proc = subprocess.run(
        [sys.executable, "-m", "smoa_mlx.chat", "--model", str(model_dir), "--adapter-path", str(adapter),
         "--max-tokens", str(MAX_TOKENS), "--system-prompt", SYSTEM],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONIOENCODING="utf-8"),
    )
    assert proc.returncode == 0, proc.stderr
    stats = [tuple(map(int, m.groups())) for m in map(STATS.match, proc.stderr.splitlines()) if m]
    assert len(stats) == 3, proc.stderr  # U1, U2, U1 again; nothing after /quit
    assert "[conversation reset]" in proc.stderr

    # Independent expectations: greedy mlx-lm generation on the fully rendered history, no cache reuse.
    live, tok = load_model_with_adapter(str(model_dir), adapter)
    p1 = render(tok, U1)
    a1 = mlx_lm.generate(live, tok, p1, max_tokens=MAX_TOKENS)
    p2 = render(tok, U1, a1, U2)
    a2 = mlx_lm.generate(live, tok, p2, max_tokens=MAX_TOKENS)
    assert a1.strip() and a2.strip()
    assert proc.stdout.split("\n") == [a1, a2, a1, ""]

    (n1, new1, g1), (n2, new2, g2), (n3, new3, _) = stats
    assert (n1, new1) == (len(p1), len(p1)) and g1 >= 1
    # The second prompt holds the first exchange (template-exact), and only its new part was prefilled.
    assert n2 == len(p2) and len(p2) > len(render(tok, U2)) + 2
    assert new2 < n2
    # After /reset the conversation starts afresh: the same prompt as the first turn, the same reply.
    assert n3 == len(p1)


def test_generate_one_shot(tiny, capsys):
    model_dir, adapter = tiny
    argv = ["--model", str(model_dir), "--adapter-path", str(adapter), "--prompt", U1, "-m", str(MAX_TOKENS)]
    assert generate.main(argv) == 0
    out = capsys.readouterr()
    live, tok = load_model_with_adapter(str(model_dir), adapter)
    prompt = tok.apply_chat_template([{"role": "user", "content": U1}], add_generation_prompt=True)
    assert out.out == mlx_lm.generate(live, tok, prompt, max_tokens=MAX_TOKENS) + "\n"
    assert f"[prompt {len(prompt)} tokens" in out.err

    assert generate.main(argv + ["--raw-prompt"]) == 0
    raw = mlx_lm.generate(live, tok, tok.encode(U1), max_tokens=MAX_TOKENS)
    assert capsys.readouterr().out == raw + "\n"


def test_sampling_flags(tiny, capsys):
    """--temp/--top-p sample (reproducibly for a --seed) instead of the greedy reply."""
    model_dir, adapter = tiny
    base = ["--model", str(model_dir), "--adapter-path", str(adapter), "--prompt", U1, "-m", "12"]
    replies = []
    for extra in ([], ["--temp", "5", "--seed", "1"], ["--temp", "5", "--seed", "1"], ["--temp", "5", "--top-p", "0.9",
                                                                                        "--seed", "2"]):
        assert generate.main(base + extra) == 0
        replies.append(capsys.readouterr().out)
    greedy, sampled, again, other = replies
    assert sampled == again
    assert len({greedy, sampled, other}) == 3


def test_generate_bad_flags(tiny, capsys):
    model_dir, _ = tiny
    code = generate.cli.run(generate.main, "smoa_mlx.generate", ["--model", str(model_dir), "--prompt", "x",
                                                                 "--adapter-path", str(model_dir / "nope")])
    assert code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", str(model_dir), "--prompt", "x", "--top-p", "0"])
