"""Multiple-choice accuracy of a language model: the option it assigns the highest log-likelihood wins.

Each (prompt, option) pair is tokenized by mlx-lm's own ``CompletionsDataset`` with the prompt masked, i.e. exactly
as the training examples are, so the scored tokens are the ones training put the loss on (the option text and the
chat template's end-of-turn tokens). Two rankings come out of one pass: by the mean log-likelihood per option token
(the headline number; it does not favour short options) and by the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tuner.datasets import CompletionsDataset

from .bigbench import Example

SCORINGS = ("mean", "sum")


@dataclass
class ChoiceScores:
    """Per example and option: summed log-likelihood and token count of the option."""

    sums: list[list[float]]
    counts: list[list[int]]
    answers: list[int]

    def predictions(self, scoring: str = "mean") -> list[int]:
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        out = []
        for sums, counts in zip(self.sums, self.counts):
            values = [s / c for s, c in zip(sums, counts)] if scoring == "mean" else list(sums)
            out.append(int(np.argmax(values)))
        return out

    def accuracy(self, scoring: str = "mean") -> float:
        if not self.answers:
            return 0.0
        hits = sum(p == a for p, a in zip(self.predictions(scoring), self.answers))
        return hits / len(self.answers)


def encode(tokenizer: TokenizerWrapper, prompt: str, option: str) -> tuple[list[int], int]:
    """(tokens, offset of the first option token), as training tokenizes a completions record."""
    dataset = CompletionsDataset([], tokenizer, "prompt", "completion", mask_prompt=True)
    tokens, offset = dataset.process({"prompt": prompt, "completion": option})
    tokens = list(tokens)
    if not 0 < offset < len(tokens):
        raise ValueError(f"option {option!r} adds no tokens after the prompt (offset {offset}, {len(tokens)} tokens)")
    return tokens, offset


def _batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length, each batch padded to at most ``max_tokens`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _option_loglik(model: nn.Module, seqs: list[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability and count of the tokens from each sequence's offset on (teacher forcing)."""
    width = max(len(t) for t, _ in seqs) - 1
    inputs = np.zeros((len(seqs), width), dtype=np.int32)
    targets = np.zeros((len(seqs), width), dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.float32)
    for row, (tokens, offset) in enumerate(seqs):
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        targets[row, :n] = tokens[1:]
        mask[row, offset - 1 : n] = 1.0  # position t predicts token t + 1
    logits = model(mx.array(inputs)).astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(targets)[..., None], axis=-1)[..., 0]
    logp = (picked - mx.logsumexp(logits, axis=-1)) * mx.array(mask)
    sums = logp.sum(axis=1)
    mx.eval(sums)
    return np.array(sums), mask.sum(axis=1).astype(np.int64)


@dataclass
class Encoded:
    """The tokenized (prompt, option) pairs of some examples: tokenize once, score many models."""

    examples: Sequence[Example]
    seqs: list[tuple[list[int], int]]
    owner: list[tuple[int, int]]  # (example index, option index) of each sequence


def encode_examples(tokenizer: TokenizerWrapper, examples: Sequence[Example]) -> Encoded:
    seqs, owner = [], []
    for i, ex in enumerate(examples):
        for j, option in enumerate(ex.options):
            seqs.append(encode(tokenizer, ex.prompt, option))
            owner.append((i, j))
    return Encoded(examples, seqs, owner)


def score_choices(model: nn.Module, tokenizer: TokenizerWrapper, examples: Sequence[Example] | Encoded,
                  max_tokens: int = 4096) -> ChoiceScores:
    """Log-likelihood of every option of every example; ``max_tokens`` bounds one forward batch (padded).
    ``examples`` may come already tokenized (:func:`encode_examples`)."""
    encoded = examples if isinstance(examples, Encoded) else encode_examples(tokenizer, examples)
    examples, seqs, owner = encoded.examples, encoded.seqs, encoded.owner
    sums = [[0.0] * len(ex.options) for ex in examples]
    counts = [[0] * len(ex.options) for ex in examples]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches([len(t) for t, _ in seqs], max_tokens):
            s, c = _option_loglik(model, [seqs[k] for k in batch])
            for k, value, count in zip(batch, s, c):
                i, j = owner[k]
                sums[i][j], counts[i][j] = float(value), int(count)
    finally:
        model.train(was_training)
    return ChoiceScores(sums, counts, [ex.answer for ex in examples])
