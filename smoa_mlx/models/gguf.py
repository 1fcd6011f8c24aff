"""Read a llama-architecture GGUF file into mlx-lm's llama model format (config dict + weight dict).

MLX's own GGUF reader (``mx.load(path, return_metadata=True)``) does the byte-level work: it returns Q4_0, Q4_1
and Q8_0 tensors as MLX affine-quantized triplets (``weight`` packed uint32, ``scales``, ``biases``, group size
32), which is exact for Q4_1 (each block of 32 is ``d * q + m``, i.e. MLX's ``scale * q + bias``). Other GGUF
quantization types come back already dequantized. This module only renames tensors, undoes llama.cpp's Q/K row
permutation and builds the mlx-lm config, so the same code serves any llama GGUF, not just the embedded one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

import mlx.core as mx
import numpy as np

PathLike = Union[str, Path]

GROUP_SIZE = 32  # every GGUF block format MLX maps to affine quantization (Q4_0, Q4_1, Q8_0) uses blocks of 32

# GGUF tensor name -> mlx-lm llama module path (the weight/scales/biases suffix is kept).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|scales|biases|bias)$")


def read_gguf(path: PathLike) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """Tensors and metadata of a GGUF file, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # MLX raises a bare RuntimeError/ValueError without the file name
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def _meta_value(v: Any) -> Any:
    """GGUF scalars arrive as 0-d mx.arrays; configs want plain Python numbers.

    float32 values are written back at float32 precision (1e-05, not 9.999999747378752e-06), as HF configs read.
    """
    if isinstance(v, mx.array):
        if v.ndim == 0 and v.dtype == mx.float32:
            return float(str(np.float32(v.item())))  # numpy prints a float32's shortest round-trip form
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def gguf_config(metadata: dict[str, Any], source: str = "GGUF") -> dict[str, Any]:
    """The mlx-lm llama config (config.json contents) that the GGUF's ``llama.*`` metadata describes."""
    arch = _meta_value(metadata.get("general.architecture"))
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")

    def need(key: str) -> Any:
        if key not in metadata:
            raise ValueError(f"{source}: metadata key {key!r} is missing")
        return _meta_value(metadata[key])

    def opt(key: str, default: Any = None) -> Any:
        return _meta_value(metadata[key]) if key in metadata else default

    hidden = int(need("llama.embedding_length"))
    heads = int(need("llama.attention.head_count"))
    vocab = opt("llama.vocab_size")
    if vocab is None:  # older converters leave it out; the token list is authoritative
        vocab = len(need("tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("llama.block_count")),
        "intermediate_size": int(need("llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(opt("llama.attention.head_count_kv", heads)),
        "head_dim": int(opt("llama.attention.key_length", opt("llama.rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(need("llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "rope_theta": float(opt("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(opt("llama.context_length", 2048)),
        "rope_traditional": False,  # the Q/K un-permutation below restores HF's half-split rope layout
    }
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            config[key] = int(_meta_value(metadata[f"tokenizer.ggml.{key}"]))
    return config


def llamacpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's ``convert_hf_to_gguf`` row permutation of q_proj/k_proj (HF half-split rope -> interleaved).

    Rows are the output dimension, so it applies unchanged to a packed quantized weight and its scales/biases.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: mx.array, n_head: int) -> mx.array:
    """Inverse of :func:`llamacpp_permute`: back to the row order HF/mlx-lm's rope expects."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def packed_bits(weight: mx.array, scales: mx.array) -> int:
    """Bits per value of an MLX-packed weight (4 for Q4_0/Q4_1, 8 for Q8_0), from the packed and group widths."""
    return weight.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def _rename(name: str, source: str) -> str:
    m = _BLOCK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"{source}: tensor {name!r} has no llama counterpart in mlx-lm")


def gguf_weights(
    tensors: dict[str, mx.array],
    config: dict[str, Any],
    dtype: mx.Dtype = mx.float32,
    quantized: bool = False,
    source: str = "GGUF",
) -> dict[str, mx.array]:
    """mlx-lm llama weights from GGUF tensors: renamed, Q/K rows un-permuted, floats cast to ``dtype``.

    With ``quantized=False`` the affine triplets are dequantized (exactly: the result is ``scale * q + bias``
    computed in ``dtype``); with ``quantized=True`` they are kept as MLX's packed weight/scales/biases.
    """
    renamed = {_rename(k, source): v for k, v in tensors.items()}
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out: dict[str, mx.array] = {}
    for key, value in renamed.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("scales", "biases"):
            continue  # consumed together with their weight below
        if f"{module}.scales" in renamed:
            scales, biases = renamed[f"{module}.scales"], renamed[f"{module}.biases"]
            if quantized:
                parts = {"weight": value, "scales": scales.astype(dtype), "biases": biases.astype(dtype)}
            else:  # in float32 first, so float32 results are exact whatever the stored scale dtype
                s32, b32 = scales.astype(mx.float32), biases.astype(mx.float32)
                parts = {"weight": mx.dequantize(value, s32, b32, GROUP_SIZE, packed_bits(value, scales)).astype(dtype)}
        else:
            parts = {leaf: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value}
        proj = module.rpartition(".")[2]
        for suffix, arr in parts.items():
            out[f"{module}.{suffix}"] = llamacpp_unpermute(arr, heads[proj]) if proj in heads else arr
    return out
