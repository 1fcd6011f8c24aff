"""mlx-lm LoRA / DoRA adapters <-> PEFT LoRA / DoRA.

mlx-lm: ``y = x W^T + scale (x lora_a) lora_b`` with lora_a [in, r], lora_b [r, out]; DoRA rescales the output
rows by ``m / ||W + scale lora_b^T lora_a^T||_row`` before the bias. PEFT: ``lora_A.weight`` [r, in] = lora_a^T,
``lora_B.weight`` [out, r] = lora_b^T, scaling = lora_alpha / r, and DoRA's ``lora_magnitude_vector`` [out] is
mlx-lm's ``m`` with the same row norm of the same merged weight (bias added after the rescale on both sides),
so the conversion is a transpose and ``lora_alpha = scale * r``: lossless both ways.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.nn as nn

from ..adapters.folder import ADAPTER_WEIGHTS, LORA_TYPES, adapter_config, lora_modules, read_adapter, read_weights
from ..errors import ConversionError
from .common import (
    PathLike,
    base_dims,
    check_shape,
    distinct,
    num_layers_for,
    open_peft,
    require,
    resolve_model_type,
    verify_base,
    write_converted,
    write_peft,
)
from .names import block_relative, to_hf

__all__ = ["mlx_lora_to_peft", "peft_lora_to_mlx"]


def _check_module(path: str, a_shape, b_shape, rank: int, base: Optional[nn.Module], file: Path, dora: bool, m=None):
    """a_shape/b_shape in PEFT orientation: A [r, in], B [out, r]."""
    dims = base_dims(base, path)
    d_in = dims[1] if dims else a_shape[1]
    d_out = dims[0] if dims else b_shape[0]
    check_shape(f"{path} A", a_shape, (rank, d_in), file)
    check_shape(f"{path} B", b_shape, (d_out, rank), file)
    if dora:
        check_shape(f"{path} magnitude", m.shape, (d_out,), file)


def mlx_lora_to_peft(
    adapter: PathLike,
    out: PathLike,
    base: Optional[nn.Module] = None,
    model_type: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Convert an mlx-lm LoRA or DoRA adapter folder into a PEFT one (``PeftModel.from_pretrained`` loads it).

    ``base`` (the MLX base model) enables the shape and base-fingerprint checks and supplies the model type.
    """
    distinct(adapter, out, force)
    model_type = resolve_model_type(base, model_type)
    src = read_adapter(adapter, LORA_TYPES)
    dora, rank, params = src.kind == "dora", src.lora["rank"], src.lora
    weights, _ = read_weights(src.weights_file)
    modules = lora_modules(weights, src.kind, rank, src.weights_file)
    arrays = {}
    for path, parts in modules.items():
        to_hf(path, model_type)  # refuse unmappable modules before anything is written
        a, b = parts["lora_a"].T, parts["lora_b"].T
        _check_module(path, a.shape, b.shape, rank, base, src.weights_file, dora, parts.get("m"))
        arrays[(path, "lora_A.weight")] = a
        arrays[(path, "lora_B.weight")] = b
        if dora:
            arrays[(path, "lora_magnitude_vector")] = parts["m"]
    verify_base(base, src.fingerprint, str(src.folder))
    return write_peft(
        out,
        "LORA",
        rank,
        arrays,
        modules,
        model_type,
        src.fingerprint,
        base,
        lora_alpha=float(params["scale"]) * rank,
        lora_dropout=float(params.get("dropout", 0.0)),
        use_dora=dora,
        use_rslora=False,
        bias="none",
        rank_pattern={},
        alpha_pattern={},
    )


def peft_lora_to_mlx(
    adapter: PathLike,
    out: PathLike,
    base: Optional[nn.Module] = None,
    model_type: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Convert a PEFT LoRA or DoRA adapter folder into an mlx-lm one (``mlx_lm.load(..., adapter_path=out)``)."""
    distinct(adapter, out, force)
    src = open_peft(adapter, "LORA", r"lora_A\.weight|lora_B\.weight|lora_magnitude_vector", base, model_type)
    config, source = src.config, Path(adapter) / "adapter_config.json"
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise ConversionError(f"{source}: per-module {field} is not representable in mlx-lm (one rank/scale)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConversionError(f"{source}: trained biases (bias={config.get('bias')!r}) are not supported")
    dora = bool(config.get("use_dora"))
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / (rank**0.5) if config.get("use_rslora") else alpha / rank
    arrays = {}
    for path, parts in sorted(src.modules.items()):
        if not dora and "lora_magnitude_vector" in parts:
            raise ConversionError(f"{src.file}: {path} has a DoRA magnitude but use_dora is false in {source.name}")
        needed = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
        require(parts, needed, path, src.file)
        a, b = parts["lora_A.weight"], parts["lora_B.weight"]
        _check_module(path, a.shape, b.shape, rank, base, src.file, dora, parts.get("lora_magnitude_vector"))
        arrays[f"{path}.lora_a"] = a.T
        arrays[f"{path}.lora_b"] = b.T
        if dora:
            arrays[f"{path}.m"] = parts["lora_magnitude_vector"]
    lora = {
        "rank": rank,
        "scale": scale,
        "dropout": float(config.get("lora_dropout", 0.0)),
        "keys": sorted({block_relative(p) for p in src.modules}),
    }
    cfg = adapter_config("dora" if dora else "lora", lora, num_layers_for(base, src.modules), fingerprint=src.fingerprint)
    return write_converted(out, arrays, cfg, ADAPTER_WEIGHTS, {"format": "mlx"})
