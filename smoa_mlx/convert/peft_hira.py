"""SMoA -> stock PEFT HiRA (lossless) and PEFT HiRA -> SMoA with one block.

HiRA's update is ``W0 * (B A)`` with no scale. SMoA's is ``s (B_k A_k) * W0`` on K disjoint diagonal blocks, so it
is HiRA with block-sparse factors: rank slots ``o_k .. o_k + r_k`` hold block k, ``A[slot_k, C_k] = A_k`` and
``B[R_k, slot_k] = s B_k``. Then ``(B A)[R_k, C_k] = s B_k A_k`` and every entry off the blocks is exactly zero
(a row of R_k only reaches slots of block k, and those only reach columns of C_k). HiRA with rank r imports back as
SMoA with K = 1 (one block covering W0: the orders are then irrelevant, the identity is stored) and s = 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapters.folder import ADAPTER_CONFIG, SMoAModule
from ..config import SMoAConfig
from .common import (
    PathLike,
    base_dims,
    check_shape,
    distinct,
    num_layers_for,
    open_peft,
    require,
    read_smoa,
    resolve_model_type,
    to_numpy,
    write_peft,
    write_smoa,
)
from ..errors import ConversionError
from .names import block_relative, to_hf

__all__ = ["smoa_to_hira", "hira_to_smoa", "hira_factors"]


def hira_factors(module: SMoAModule, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Dense HiRA factors (A [r, d_in], B [d_out, r], float32) of one SMoA layer, the scale folded into B."""
    d_out, d_in = module.shape
    ranks = [a.shape[0] for a in module.a]
    a_full = np.zeros((sum(ranks), d_in), dtype=np.float32)
    b_full = np.zeros((d_out, sum(ranks)), dtype=np.float32)
    slot = 0
    for a, b, rows, cols, r_k in zip(module.a, module.b, module.row_groups(), module.col_groups(), ranks):
        a_full[slot : slot + r_k][:, cols] = to_numpy(a).astype(np.float32)
        b_full[rows, slot : slot + r_k] = scale * to_numpy(b).astype(np.float32)
        slot += r_k
    return a_full, b_full


def smoa_to_hira(
    adapter: PathLike,
    out: PathLike,
    base: Optional[nn.Module] = None,
    model_type: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Convert an SMoA adapter folder into a stock PEFT HiRA one (``PeftModel.from_pretrained`` loads it).

    ``base`` (the MLX base model) enables the shape and base-fingerprint checks and supplies the model type.
    """
    distinct(adapter, out, force)
    model_type = resolve_model_type(base, model_type)
    src, modules = read_smoa(adapter, base)
    config = src.smoa
    arrays = {}
    for path, module in modules.items():
        to_hf(path, model_type)
        a_full, b_full = hira_factors(module, config.scale)
        dtype = module.a[0].dtype if module.a else mx.float32
        arrays[(path, "hira_A")] = mx.array(a_full).astype(dtype)
        arrays[(path, "hira_B")] = mx.array(b_full).astype(dtype)
    return write_peft(out, "HIRA", config.rank, arrays, modules, model_type, src.fingerprint, base,
                      hira_dropout=config.dropout, init_weights=True, rank_pattern={})


def hira_to_smoa(
    adapter: PathLike,
    out: PathLike,
    base: Optional[nn.Module] = None,
    model_type: Optional[str] = None,
    force: bool = False,
) -> Path:
    """Convert a stock PEFT HiRA adapter folder into an SMoA adapter with one block (``load_adapter`` loads it)."""
    distinct(adapter, out, force)
    src = open_peft(adapter, "HIRA", r"hira_A|hira_B", base, model_type)
    rank = int(src.config["r"])
    if any(int(r) != rank for r in (src.config.get("rank_pattern") or {}).values()):
        raise ConversionError(f"{Path(adapter) / ADAPTER_CONFIG}: per-module rank_pattern cannot be one SMoA rank")
    modules = {}
    for path, parts in sorted(src.modules.items()):
        require(parts, ("hira_A", "hira_B"), path, src.file)
        a, b = parts["hira_A"], parts["hira_B"]
        d_out, d_in = base_dims(base, path) or (b.shape[0], a.shape[1])
        check_shape(f"{path}.hira_A", a.shape, (rank, d_in), src.file)
        check_shape(f"{path}.hira_B", b.shape, (d_out, rank), src.file)
        modules[path] = SMoAModule([a], [b], np.arange(d_out), np.arange(d_in))
    smoa = SMoAConfig(
        rank=rank,
        blocks=1,
        alpha=float(rank),
        dropout=float(src.config.get("hira_dropout", 0.0)),
        target_modules=sorted({block_relative(p) for p in modules}),
        num_layers=num_layers_for(base, modules),
    )
    return write_smoa(out, smoa, modules, src.fingerprint)
