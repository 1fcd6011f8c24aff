"""Tiny mlx-lm llama folders with SMoA adapters for the fuse / chat / generate tests (no downloads).

Built on ``train_helpers.build_model_folder`` (word-level tokenizer with a chat template); the quantized
variant is the same model quantized by mlx-lm, as ``mlx_lm.convert -q [--q-mode mxfp4]`` would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_map
from mlx_lm.utils import quantize_model
from train_helpers import build_model_folder

from smoa_mlx import SMoAConfig, apply_smoa, save_adapter, smoa_layers
from smoa_mlx.models.folder import save_model_folder


def make_model_folder(folder: Path, *, quantize_bits: Optional[int] = None, group_size: int = 32,
                      quantize_mode: str = "affine", **kw) -> Path:
    """A float32 tiny llama folder, or (``quantize_bits``) its quantized version: affine, or in another MLX mode
    (``quantize_mode`` "mxfp4", as mlx-community's gpt-oss models are; "nvfp4" takes ``group_size=16``).

    The matrices are scaled up from mlx's default init, whose near-uniform logits make greedy decoding repeat
    one token; sharper logits give varied replies, so chat tests see real text.
    """
    folder = Path(folder)
    dense = build_model_folder(folder.with_name(folder.name + "_init"), **kw)
    model, tokenizer, config = mlx_lm.load(str(dense), return_config=True)
    model.update(tree_map(lambda p: p * 4 if p.ndim == 2 else p, model.parameters()))
    if quantize_bits:
        model, config = quantize_model(model, config, group_size=group_size, bits=quantize_bits, mode=quantize_mode)
    return save_model_folder(folder, model, tokenizer, config)


def make_smoa_adapter(
    model_folder: Path, adapter_folder: Path, *, rank: int = 4, blocks: int = 2, b_scale: float = 2.0, seed: int = 1
) -> Path:
    """An SMoA adapter for ``model_folder`` with random non-zero B (a trained-looking update), saved as train does."""
    model, _ = mlx_lm.load(str(model_folder))
    config = SMoAConfig(rank=rank, blocks=blocks)
    mx.random.seed(seed)  # A's init and B below: the same adapter whatever ran before
    apply_smoa(model, config)
    for layer in smoa_layers(model).values():
        layer.smoa_b = [mx.random.normal(b.shape) * b_scale for b in layer.smoa_b]
    return save_adapter(model, adapter_folder, config, extra_config={"model": str(model_folder)})
