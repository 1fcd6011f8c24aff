"""Tiny real mlx-lm model folders and jsonl data for the training tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

WORDS = (
    "the a cat dog sat on mat ran to park red blue green big small what is color of sky grass sun "
    "yes no one two three four five six seven eight nine ten answer question i you it was happy sad"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer(folder: Path) -> None:
    """A word-level fast tokenizer with a chat template, saved the way Hugging Face folders hold one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<user>", "<assistant>", "<system>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>", bos_token="<eos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))


def build_model_folder(folder: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A float32 llama with random weights, saved with mlx-lm's own writers so mlx_lm.load reads it back."""
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 64,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + 3 * k) % len(WORDS)] for k in range(n))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_data_folder(folder: Path, n_train: int = 32, n_valid: int = 8, kind: str = "completions") -> Path:
    """Equal-length examples, so data-parallel ranks hold equal token counts (see test_train_distributed)."""
    def row(i):
        if kind == "text":
            return {"text": sentence(i, 8)}
        if kind == "chat":
            return {"messages": [{"role": "user", "content": sentence(i, 3)},
                                 {"role": "assistant", "content": sentence(i + 1, 3)}]}
        return {"prompt": sentence(i, 3), "completion": sentence(i + 1, 3)}

    folder = Path(folder)
    write_jsonl(folder / "train.jsonl", [row(i) for i in range(n_train)])
    write_jsonl(folder / "valid.jsonl", [row(1000 + i) for i in range(n_valid)])
    write_jsonl(folder / "test.jsonl", [row(2000 + i) for i in range(n_valid)])
    return folder
