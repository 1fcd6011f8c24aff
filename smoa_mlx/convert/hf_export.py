"""Save a (fused) MLX model as a Hugging Face transformers checkpoint that PyTorch loads as is.

mlx-lm's own ``save`` writes MLX-flavoured folders (quantization fields, ``format: mlx``, possibly quantized
weights). A deployment on PyTorch wants plain dense safetensors under transformers' names plus the tokenizer, so
this merges every adapter layer, dequantizes, and checks the family is one whose mlx-lm names are transformers'
names (see :mod:`smoa_mlx.convert.names`); anything else is refused rather than written with wrong keys.
The folder is assembled in a temporary directory beside ``path`` and moved into place only when complete
(:func:`smoa_mlx.atomic.staged_folder`). An existing folder is replaced whole, in one atomic swap, never updated
file by file: a checkpoint's files only make sense together (``config.json``, the shards, their index), and a
merge killed half way, or one from a model sharded another way, would leave new shards beside an old config or
a stale ``model-00002-of-00003.safetensors`` that transformers' and mlx-lm's loaders would read with the rest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..atomic import staged_folder
from ..errors import UnsupportedArchitectureError
from .names import FAMILIES

__all__ = ["export_hf", "fuse_adapters"]

# Fields mlx-lm adds for its quantized formats; transformers would try to build a quantizer from them.
_MLX_ONLY_KEYS = ("quantization", "quantization_config")
_EXPORTABLE = tuple(t for t, fam in FAMILIES.items() if fam.mlx_prefix == fam.hf_prefix)
_DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def fuse_adapters(model: nn.Module) -> int:
    """Merge every adapter layer that can fuse itself (SMoA, mlx-lm LoRA/DoRA) into a dense linear, in place."""
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def export_hf(
    model: nn.Module,
    tokenizer: Any,
    src_config: dict,
    path: Union[str, os.PathLike],
    dtype: Optional[mx.Dtype] = None,
    src_path: Optional[Union[str, os.PathLike]] = None,
    force: bool = False,
) -> Path:
    """Write ``model`` (adapters fused, dequantized) as a transformers checkpoint folder at ``path``.

    ``model`` / ``tokenizer`` / ``src_config`` are what ``mlx_lm.load(..., return_config=True)`` returns (with
    an SMoA adapter loaded or already fused). ``dtype`` casts floating weights (default: keep the model's).
    ``src_path``, the base model folder, contributes ``generation_config.json`` when it has one.
    An existing non-empty ``path`` is refused unless ``force``, and then replaced whole (nothing of the old folder
    stays).
    The model is modified in place (its adapters are fused). Returns the folder.
    """
    model_type = src_config.get("model_type")
    if model_type not in _EXPORTABLE:
        raise UnsupportedArchitectureError(
            f"export_hf: model_type {model_type!r} cannot be exported to transformers names "
            f"(supported: {', '.join(sorted(_EXPORTABLE))})"
        )
    fuse_adapters(model)
    from mlx_lm.utils import dequantize_model, make_shards

    dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    config = {k: v for k, v in src_config.items() if k not in _MLX_ONLY_KEYS}
    float_dtypes = {v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)}
    if len(float_dtypes) == 1:
        name = _DTYPE_NAMES.get(float_dtypes.pop())
        if name:  # transformers < 5 reads torch_dtype, 5 reads dtype: a stale one would cast the weights
            config["torch_dtype"] = config["dtype"] = name

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export_hf: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"export_hf: {out} already exists and is not empty; pass force=True to replace it")
    with staged_folder(out, what="checkpoint") as staging:
        shards = make_shards(weights)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map = {}
        for shard, name in zip(shards, names):
            mx.save_safetensors(str(staging / name), shard, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(str(staging))
        if src_path is not None and (Path(src_path) / "generation_config.json").is_file():
            shutil.copy(Path(src_path) / "generation_config.json", staging)
    return out
