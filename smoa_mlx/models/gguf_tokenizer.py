"""A Hugging Face fast tokenizer rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

GGUF stores a byte-level BPE tokenizer as its token list, merge list, token types and pre-tokenizer name.
Rebuilding it with the `tokenizers` library (already a dependency of transformers, which mlx-lm requires)
gives a real ``PreTrainedTokenizerFast``: it saves as ``tokenizer.json`` and loads back through
``AutoTokenizer``/``mlx_lm.load``, and mlx-lm's streaming BPE detokenizer works on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:  # hints only: transformers is imported on first use
    from transformers import PreTrainedTokenizerFast

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> what it does before byte-level BPE (llama-vocab.cpp):
# "gpt2" uses GPT-2's split regex, which is the HF ByteLevel pre-tokenizer's own; "smollm" and "starcoder" first
# split off every digit ("\p{N}", HF: Digits(individual_digits=True)). Other names use other regexes: refused.
_GPT2 = "gpt2"
_PRE_TOKENIZERS = {"gpt2": (), "smollm": ("digits",), "starcoder": ("digits",)}
_CONTROL = 3  # llama.cpp token type: control (special) token
_USER_DEFINED = 4


def _scalar(metadata: dict[str, Any], key: str) -> Any:
    v = metadata.get(key)
    return v.item() if isinstance(v, mx.array) and v.ndim == 0 else v


def gguf_tokenizer(metadata: dict[str, Any], source: str = "GGUF") -> PreTrainedTokenizerFast:
    """A ``transformers.PreTrainedTokenizerFast`` equal to the GGUF's tokenizer, chat template included."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = _scalar(metadata, "tokenizer.ggml.model")
    if kind != _GPT2:
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    pre = _scalar(metadata, "tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not supported (known: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")

    def token(key: str):
        i = _scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(_scalar(metadata, "tokenizer.ggml.add_space_prefix")))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if "digits" in _PRE_TOKENIZERS[pre] else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [byte_level])
    tok.decoder = decoders.ByteLevel()
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token"))
    bos = token("bos")
    if add_bos and bos is not None:  # the GGUF asks for a BOS on every encode, as llama.cpp would add
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if isinstance(types, mx.array) else list(types or [])
    # Control tokens are never split by BPE and are dropped by skip_special_tokens; user-defined ones are
    # only never split. Both must be registered, or the chat markers would be BPE-encoded as plain text.
    special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED])

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        additional_special_tokens=[t for t in special if t not in {token("bos"), token("eos"), token("unknown")}],
        chat_template=_scalar(metadata, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(_scalar(metadata, "llama.context_length") or 2048),
    )
