"""What an adapter trained on the packaged demo set changed: answer-only test loss and greedy answers, base vs
adapted, on the held-out test questions (smoa_mlx/data/test.jsonl).

    python scripts/demo_check.py ADAPTER_PATH [--questions 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

from mlx_lm import generate
from mlx_lm.tuner.trainer import evaluate

from smoa_mlx.adapters import apply_adapter
from smoa_mlx.loading import load_model
from smoa_mlx.train.data import PACKAGED_DATA, load_splits, read_jsonl
from smoa_mlx.train.loop import BatchStream


def measure(model, tokenizer, questions: list[dict]) -> dict:
    test = load_splits(None, tokenizer, 2048, 1, mask_prompt=True, need=("test",), warn=lambda *_: None)["test"]
    model.eval()
    loss = evaluate(model, test, 1, -1, 2048, iterate_batches=BatchStream(0))
    answers = []
    for q in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q["prompt"]}], add_generation_prompt=True)
        answers.append(generate(model, tokenizer, prompt, max_tokens=40, verbose=False).strip())
    return {"answer_loss": loss, "answer_ppl": math.exp(loss), "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter_path")
    p.add_argument("--questions", type=int, default=6)
    p.add_argument("--json")
    a = p.parse_args()
    questions = read_jsonl(PACKAGED_DATA / "test.jsonl")[: a.questions]
    model, tokenizer = load_model(None)
    base = measure(model, tokenizer, questions)
    apply_adapter(model, a.adapter_path)
    tuned = measure(model, tokenizer, questions)
    print(f"answer-token test loss: base {base['answer_loss']:.4f} -> adapted {tuned['answer_loss']:.4f} "
          f"(ppl {base['answer_ppl']:.2f} -> {tuned['answer_ppl']:.2f})")
    for q, b, t in zip(questions, base["answers"], tuned["answers"]):
        print(f"\nQ: {q['prompt']}\n  base:    {b!r}\n  adapted: {t!r}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"questions": [q["prompt"] for q in questions], "base": base, "adapted": tuned}, f, indent=2)


if __name__ == "__main__":
    main()
