"""One held-out question answered before and after training: what a loss figure cannot show a newcomer.

The question is the first record of the test split (else the validation split) in ``chat`` or ``completions``
form, asked through the tokenizer's chat template as training saw it, and answered greedily, as
``mlx_lm.generate`` does by default. Plain ``text`` data has no question, so there is no preview.
"""

from __future__ import annotations

from typing import Optional

import mlx.nn as nn
from mlx_lm import generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

MAX_TOKENS = 32  # the demo's answers are one sentence; an untrained model's rambling is cut here


def held_out_question(checked: Optional[dict]) -> Optional[list[dict]]:
    """The chat messages to ask, from :func:`~smoa_mlx.train.data.check_data`'s records (None for hub data)."""
    for split in ("test", "valid"):
        if not checked or split not in checked:
            continue
        row = checked[split][0][0]
        if "prompt" in row and "completion" in row:
            return [{"role": "user", "content": row["prompt"]}]
        if "messages" in row:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
            return messages[:last] or None
        return None
    return None


def answer(model: nn.Module, tokenizer: TokenizerWrapper, messages: list[dict], max_tokens: int = MAX_TOKENS) -> str:
    """Greedy reply to ``messages`` on one line. The model is left in eval mode: no dropout, and SMoA layers
    answer from their merged weight instead of re-gathering their anchors for every token."""
    model.eval()
    if getattr(tokenizer, "has_chat_template", False):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = tokenizer.encode("\n".join(m["content"] for m in messages))
    text = generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)
    return " ".join(text.split())


def question_text(messages: list[dict]) -> str:
    return " ".join(messages[-1]["content"].split())
