"""A conversation with a model: history rendered by the tokenizer's chat template, replies streamed by mlx-lm.

Every turn re-renders the whole history through the template (so the model sees exactly what the template
defines, system prompt and earlier exchanges included) and reuses the KV cache for the prefix it shares with
what was already computed: only the new tokens are prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TextIO

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, stream_generate
from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import common_prefix_len

from .errors import NoChatTemplateError

Sampler = Callable[[mx.array], mx.array]


@dataclass
class TurnStats:
    """What one reply cost: prompt length after templating, how much of it was new, tokens generated."""

    prompt_tokens: int
    new_tokens: int
    generated_tokens: int
    generation_tps: float
    finish_reason: Optional[str]

    @classmethod
    def of(cls, response: GenerationResponse, prompt_tokens: int, new_tokens: int) -> "TurnStats":
        return cls(prompt_tokens, new_tokens, response.generation_tokens, response.generation_tps,
                   response.finish_reason)

    def line(self) -> str:
        return (
            f"[prompt {self.prompt_tokens} tokens ({self.new_tokens} new), "
            f"{self.generated_tokens} generated, {self.generation_tps:.1f} tok/s, "
            f"finish: {self.finish_reason}]"
        )


class Conversation:
    def __init__(self, model: nn.Module, tokenizer: TokenizerWrapper, system_prompt: Optional[str] = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise NoChatTemplateError(
                "the tokenizer has no chat template; use `python -m smoa_mlx.generate --raw-prompt` for plain text"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = []
        if self.system_prompt is not None:
            self.messages.append({"role": "system", "content": self.system_prompt})
        self._drop_cache()

    def _drop_cache(self) -> None:
        self.cache = make_prompt_cache(self.model)
        self._cached: list[int] = []  # the tokens whose keys/values the cache holds, in order

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def _reusable(self) -> bool:
        return bool(self.cache) and all(type(c) is KVCache for c in self.cache)

    def _reuse_cache(self, tokens: list[int]) -> int:
        """Trim the cache to the prefix it shares with ``tokens``; returns how many tokens it keeps.

        Only plain KV caches are reused: their length is exact and trimming them is exact. Sliding-window,
        recurrent or quantized caches are rebuilt every turn instead (correct, just slower).
        """
        if not self._reusable():
            self._drop_cache()
            return 0
        keep = common_prefix_len(self._cached, tokens)
        keep = min(keep, len(tokens) - 1)  # at least one token must be fed to get logits
        if keep < len(self._cached):
            trim_prompt_cache(self.cache, len(self._cached) - keep)
            self._cached = self._cached[:keep]
        return keep

    def reply(self, text: str, max_tokens: int, sampler: Optional[Sampler] = None) -> Iterator[GenerationResponse]:
        """Stream the answer to the user message ``text``; the exchange joins the history when it is complete."""
        user = {"role": "user", "content": text}
        tokens = self.render(self.messages + [user])
        keep = self._reuse_cache(tokens)
        generated: list[int] = []
        answer: list[str] = []
        try:
            for response in stream_generate(
                self.model, self.tokenizer, mx.array(tokens[keep:]), max_tokens=max_tokens,
                sampler=sampler, prompt_cache=self.cache,
            ):
                generated.append(response.token)
                answer.append(response.text)
                yield response
        except BaseException:
            # Interrupted mid-reply: which tokens reached the cache is unknown, so start it afresh.
            self._drop_cache()
            raise
        fed = tokens + generated
        self._cached = fed[: self.cache[0].offset] if self._reusable() else []
        self.messages += [user, {"role": "assistant", "content": "".join(answer)}]
        self.last_stats = TurnStats.of(response, prompt_tokens=len(tokens), new_tokens=len(tokens) - keep)


def stream_to(responses: Iterator[GenerationResponse], out: TextIO) -> Optional[GenerationResponse]:
    """Write the text of each streamed response as it comes, then a newline; returns the last response."""
    last = None
    for last in responses:
        out.write(last.text)
        out.flush()
    out.write("\n")
    out.flush()
    return last
