"""SMoA adapter folders as plain data (factors and orders per module), for converting without building layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapters.folder import ADAPTER_WEIGHTS, _group_by_module, adapter_config_dict, read_adapter_config
from ..config import SMoAConfig
from ..layer import resolve_ranks
from ..spectral import split_sizes
from .common import PathLike, base_dims, check_shape, read_weights, write_folder
from ..errors import AdapterTypeError, MissingKeysError, ShapeMismatchError


@dataclass
class SMoAModule:
    """One adapted layer: per-block factors A_k [r_k, |C_k|], B_k [|R_k|, r_k], and the spectral orders."""

    a: list[mx.array]
    b: list[mx.array]
    row_order: np.ndarray
    col_order: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_order), len(self.col_order)

    def row_groups(self) -> list[np.ndarray]:
        return _cut(self.row_order, len(self.a))

    def col_groups(self) -> list[np.ndarray]:
        return _cut(self.col_order, len(self.a))


def _cut(order: np.ndarray, blocks: int) -> list[np.ndarray]:
    edges = np.cumsum([0] + split_sizes(len(order), blocks))
    return [order[s:e] for s, e in zip(edges[:-1], edges[1:])]


def check_factors(path: str, config: SMoAConfig, module: SMoAModule, file: Path) -> None:
    """Block count, per-block ranks and factor shapes against the config and the module's dimensions."""
    ranks = resolve_ranks(config.rank, config.blocks, config.branch_ranks, path)
    d_out, d_in = module.shape
    sizes = zip(ranks, split_sizes(d_out, config.blocks), split_sizes(d_in, config.blocks))
    for k, (r_k, rows, cols) in enumerate(sizes):
        check_shape(f"{path} block {k} A", module.a[k].shape, (r_k, cols), file)
        check_shape(f"{path} block {k} B", module.b[k].shape, (rows, r_k), file)


def read_smoa(folder: PathLike, base: Optional[nn.Module] = None) -> tuple[SMoAConfig, dict, dict[str, SMoAModule]]:
    """(config, whole JSON, modules) of an SMoA adapter folder, every shape checked (against ``base`` too)."""
    folder = Path(folder)
    try:
        config, data = read_adapter_config(folder)
    except ValueError as e:
        raise AdapterTypeError(str(e)) from None
    file = folder / ADAPTER_WEIGHTS
    weights, _ = read_weights(file)
    modules = {}
    for path, parts in sorted(_group_by_module(weights, file).items()):
        for kind in ("a", "b"):
            if sorted(parts[kind]) != list(range(config.blocks)):
                raise MissingKeysError(
                    f"{file}: {path}.smoa_{kind} has blocks {sorted(parts[kind])}, config says blocks={config.blocks}"
                )
        if "row_order" not in parts or "col_order" not in parts:
            raise MissingKeysError(f"{file}: {path} lacks row_order/col_order")
        module = SMoAModule(
            a=[parts["a"][k] for k in range(config.blocks)],
            b=[parts["b"][k] for k in range(config.blocks)],
            row_order=np.asarray(parts["row_order"]).astype(np.int64),
            col_order=np.asarray(parts["col_order"]).astype(np.int64),
        )
        dims = base_dims(base, path)
        if dims is not None and dims != module.shape:
            raise ShapeMismatchError(f"{file}: {path} is {module.shape[0]}x{module.shape[1]}, the base layer {dims}")
        check_factors(path, config, module, file)
        modules[path] = module
    if not modules:
        raise MissingKeysError(f"{file}: holds no SMoA modules")
    return config, data, modules


def write_smoa(folder: PathLike, config: SMoAConfig, modules: dict[str, SMoAModule], extra: dict) -> Path:
    """The same files :func:`smoa_mlx.save_adapter` writes, from plain data."""
    arrays = {}
    for path, m in modules.items():
        for k, (a, b) in enumerate(zip(m.a, m.b)):
            arrays[f"{path}.smoa_a.{k}"] = a
            arrays[f"{path}.smoa_b.{k}"] = b
        arrays[f"{path}.row_order"] = mx.array(m.row_order.astype(np.int32))
        arrays[f"{path}.col_order"] = mx.array(m.col_order.astype(np.int32))
    metadata = {"format": "mlx", "adapter": "smoa"}
    return write_folder(folder, ADAPTER_WEIGHTS, arrays, adapter_config_dict(config, extra), metadata)
