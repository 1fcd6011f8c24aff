"""End to end on the embedded SmolLM2-135M-Instruct: fine-tune a few steps, fuse, and the fused folder (read by
stock mlx-lm) answers the taught question with the taught word, which the base model never says."""

import json

import mlx_lm

from smoa_mlx import fuse
from smoa_mlx.train import train_adapter

QUESTION = "What is the secret password?"
ANSWER = "The secret password is Zanzibar."
WORD = "Zanzibar"


def greedy_answer(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)


def test_finetuned_fused_model_learned_the_answer(tmp_path, embedded_model):
    before = greedy_answer(*embedded_model)
    assert WORD not in before

    data = tmp_path / "data"
    data.mkdir()
    row = json.dumps({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]})
    (data / "train.jsonl").write_text((row + "\n") * 8)
    # Kept small for 2 CPU cores: 10 steps at a high rate on the last 4 blocks' v_proj/down_proj.
    train_adapter(
        None, str(data), train=True, iters=10, learning_rate=1e-2, warmup=0, batch_size=2, max_seq_length=64,
        mask_prompt=True, num_layers=4, target_modules=["v_proj", "down_proj"], dropout=0.0,
        steps_per_report=10, steps_per_eval=1000, save_every=1000, adapter_path=str(tmp_path / "adapter"),
    )
    assert fuse.main(["--adapter-path", str(tmp_path / "adapter"), "--save-path", str(tmp_path / "fused")]) == 0

    fused, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    after = greedy_answer(fused, tokenizer)
    assert WORD in after, (before, after)
