"""SMoA adapters <-> the reference SMoA PyTorch format (misonsky/SMoA).

The reference stores only the factors (``base_model.model.<path>.lora_A.<k>.weight`` [r_k, |C_k|] and
``lora_B.<k>.weight`` [|R_k|, r_k]) and recomputes the row/column groups from W0 every time it builds a layer,
with a float32 SVD. Factor row i of block k belongs to coordinate ``R_k[i]``, so the order *within* a group
matters as much as the group itself. Both directions therefore recompute the reference's own float32 ordering
(with torch when it is installed, the reference's own call; numpy's float32 SVD otherwise):

- import: that ordering becomes the SMoA adapter's stored ``row_order`` / ``col_order``;
- export: the adapter's factors are permuted within each group to that ordering (exact); if a coordinate would
  change group, the update cannot be expressed in the reference format and :class:`GroupingMismatchError` says
  which module and how many coordinates.

Near-equal scores make the recomputation fragile: another device or library can order them the other way. The
converters compare the float32 ordering with the float64 one (:func:`smoa_mlx.spectral.spectral_scores`) and the
gaps at group boundaries (:func:`smoa_mlx.spectral.order_margin`) and warn with :class:`FragileGroupingWarning`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapters.apply import get_module
from ..adapters.folder import SMoAModule, cut_groups
from ..config import SMoAConfig, resolve_ranks
from ..layer import dequantized_weight
from ..spectral import order_margin, spectral_order, spectral_scores, spectral_scores_svd, split_rank, split_sizes
from .common import (
    PathLike,
    base_dims,
    check_shape,
    distinct,
    num_layers_for,
    open_peft,
    read_smoa,
    resolve_model_type,
    write_peft,
    write_smoa,
)
from ..errors import ConversionError, GroupingMismatchError, MissingKeysError
from .names import block_relative, to_hf

__all__ = [
    "FragileGroupingWarning",
    "GroupingMismatchError",
    "reference_orders",
    "reference_to_smoa",
    "smoa_to_reference",
]

# Relative score gap below which float32 rounding can flip two coordinates, inside a group or across a boundary.
# On the embedded SmolLM2-135M (layer 3) the pairs the float32 and float64 orders flip are up to 1.0e-6 apart;
# 1e-5 leaves a margin for larger matrices and other SVD libraries.
NEAR_TIE = 1e-5
BOUNDARY_MARGIN = NEAR_TIE


class FragileGroupingWarning(UserWarning):
    """The reference's recomputed grouping of a module depends on float32 rounding."""


def reference_orders(
    weight: np.ndarray, use_torch: Optional[bool] = None, method: str = "svd32"
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's (row order, column order): float32 SVD scores, ascending.

    ``method="gram"`` uses the float64 Gram eigendecomposition instead (:func:`smoa_mlx.spectral.spectral_order`):
    many times faster on big layers, and it differs from a float32 SVD only at near-tied scores, which the
    reference's own GPU SVD may order either way anyway.
    """
    if method == "gram":
        return spectral_order(weight)
    if method != "svd32":
        raise ValueError(f"reference_orders: unknown method {method!r} (use 'svd32' or 'gram')")
    w = np.asarray(weight, dtype=np.float32)
    if use_torch is None:
        try:
            import torch  # noqa: F401

            use_torch = True
        except ImportError:
            use_torch = False
    if use_torch:
        import torch

        from .torch_reference import reference_orders as torch_orders

        rows, cols = torch_orders(torch.from_numpy(w))
        return rows.numpy().astype(np.int64), cols.numpy().astype(np.int64)
    row_scores, col_scores = spectral_scores_svd(w, dtype=np.float32)
    return np.argsort(row_scores, kind="stable"), np.argsort(col_scores, kind="stable")


def _fragility(weight: np.ndarray, rows: np.ndarray, cols: np.ndarray, blocks: int) -> tuple[int, int, float]:
    """(near-tied adjacent scores, positions where float32 and float64 orders differ, smallest boundary gap)."""
    row_scores, col_scores = spectral_scores(weight)  # float64
    near = moved = 0
    margin = np.inf
    for scores, order in ((row_scores, rows), (col_scores, cols)):
        moved += int((np.argsort(scores, kind="stable") != order).sum())
        ranked = np.sort(scores)
        near += int((np.diff(ranked) < NEAR_TIE * max(float(np.abs(ranked).max()), 1e-30)).sum())
        margin = min(margin, order_margin(scores, split_sizes(len(order), blocks)))
    return near, moved, float(margin)


def _warn_fragile(report: dict[str, tuple[int, int, float]]) -> None:
    fragile = {p: v for p, v in report.items() if v[0] or v[1] or v[2] < BOUNDARY_MARGIN}
    if not fragile:
        return
    worst = sorted(fragile.items(), key=lambda kv: (kv[1][2] >= BOUNDARY_MARGIN, -kv[1][1], -kv[1][0]))[:3]
    detail = "; ".join(f"{p}: {n} near ties, {m} moved, boundary gap {g:.1e}" for p, (n, m, g) in worst)
    warnings.warn(
        f"the reference recomputes the spectral grouping on its own device, and {len(fragile)} of {len(report)} "
        f"modules have near-equal scores whose order float32 rounding can flip (a flip inside a group swaps two "
        f"rows or columns of that block's update; across a boundary it moves a coordinate to another block). "
        f"This conversion follows the float32 CPU ordering. Most affected: {detail}",
        FragileGroupingWarning,
        stacklevel=3,
    )


def _base_weight(base: nn.Module, path: str) -> np.ndarray:
    module = get_module(base, path)
    return np.asarray(dequantized_weight(getattr(module, "linear", module)).astype(mx.float32))


def _require_base(base: Optional[nn.Module], what: str) -> nn.Module:
    if base is None:
        raise ConversionError(f"{what} needs the base model: the reference recomputes the groups from W0")
    return base


def smoa_to_reference(
    adapter: PathLike,
    out: PathLike,
    base: nn.Module,
    model_type: Optional[str] = None,
    order: str = "svd32",
    force: bool = False,
) -> Path:
    """Convert an SMoA adapter folder into the reference SMoA format, for the base model ``base``.

    ``base`` must be the model the reference will load (the float checkpoint, not a quantized copy).
    ``order`` is how the reference's ordering is recomputed (see :func:`reference_orders`).
    """
    distinct(adapter, out, force)
    _require_base(base, "smoa_to_reference")
    model_type = resolve_model_type(base, model_type)
    src, modules = read_smoa(adapter, base)
    config = src.smoa
    arrays, problems, report = {}, [], {}
    for path, module in modules.items():
        to_hf(path, model_type)
        weight = _base_weight(base, path)
        rows, cols = reference_orders(weight, method=order)
        report[path] = _fragility(weight, rows, cols, config.blocks)
        ref_rows, ref_cols = cut_groups(rows, config.blocks), cut_groups(cols, config.blocks)
        for k, (a, b, mine_r, mine_c, want_r, want_c) in enumerate(
            zip(module.a, module.b, module.row_groups(), module.col_groups(), ref_rows, ref_cols)
        ):
            row_perm, col_perm = _permutation(mine_r, want_r), _permutation(mine_c, want_c)
            if row_perm is None or col_perm is None:
                n_r = len(set(mine_r.tolist()) - set(want_r.tolist()))
                n_c = len(set(mine_c.tolist()) - set(want_c.tolist()))
                problems.append(f"{path} block {k}: {n_r} rows and {n_c} columns fall in another group")
                continue
            if a.shape[0] == 0:
                continue
            arrays[(path, f"lora_A.{k}.weight")] = mx.take(a, mx.array(col_perm), axis=1)
            arrays[(path, f"lora_B.{k}.weight")] = mx.take(b, mx.array(row_perm), axis=0)
    _warn_fragile(report)
    if problems:
        raise GroupingMismatchError(
            f"{adapter}: the reference's float32 grouping of this base differs from the adapter's "
            f"(was it trained on another or a quantized copy of the base?):\n  " + "\n  ".join(problems[:8])
        )
    return write_peft(
        out,
        "SMOA",
        config.rank,
        arrays,
        modules,
        model_type,
        src.fingerprint,
        base,
        num_blocks=config.blocks,
        branch_ranks=config.branch_ranks,
        lora_alpha=config.effective_alpha,
        lora_dropout=config.dropout,
        bias="none",
        init_lora_weights=True,
    )


def _permutation(mine: np.ndarray, want: np.ndarray) -> Optional[np.ndarray]:
    """p with mine[p] == want, or None when the two hold different coordinates."""
    if len(mine) != len(want) or set(mine.tolist()) != set(want.tolist()):
        return None
    position = {int(c): i for i, c in enumerate(mine)}
    return np.array([position[int(c)] for c in want], dtype=np.int32)


def reference_to_smoa(
    adapter: PathLike,
    out: PathLike,
    base: nn.Module,
    model_type: Optional[str] = None,
    order: str = "svd32",
    force: bool = False,
) -> Path:
    """Convert a reference-format SMoA adapter into an SMoA adapter folder for ``base`` (``load_adapter``).

    ``order`` is how the reference's ordering is recomputed (see :func:`reference_orders`).
    """
    distinct(adapter, out, force)
    _require_base(base, "reference_to_smoa")
    src = open_peft(adapter, "SMOA", r"lora_[AB]\.\d+\.weight", base, model_type)
    ref, source, file = src.config, Path(adapter) / "adapter_config.json", src.file
    try:
        rank, blocks, branch = int(ref["r"]), int(ref.get("num_blocks", 2)), ref.get("branch_ranks")
        if branch is None and blocks > rank:  # the reference leaves the extra blocks empty: say so explicitly
            branch = split_rank(rank, blocks)
        config = SMoAConfig(
            rank=rank,
            blocks=blocks,
            alpha=float(ref.get("lora_alpha", 8)),
            dropout=float(ref.get("lora_dropout", 0.0)),
            branch_ranks=branch,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{source}: bad SMoA fields ({e})") from None
    if ref.get("bias", "none") != "none":
        raise ConversionError(f"{source}: trained biases (bias={ref.get('bias')!r}) are not supported")
    modules, report = {}, {}
    for path, parts in sorted(src.modules.items()):
        d_out, d_in = base_dims(base, path)
        ranks = resolve_ranks(config.rank, config.blocks, config.branch_ranks, path)
        weight = _base_weight(base, path)
        rows, cols = reference_orders(weight, method=order)
        report[path] = _fragility(weight, rows, cols, config.blocks)
        a_list, b_list = [], []
        sizes = zip(ranks, split_sizes(d_out, config.blocks), split_sizes(d_in, config.blocks))
        for k, (r_k, n_rows, n_cols) in enumerate(sizes):
            a_key, b_key = f"lora_A.{k}.weight", f"lora_B.{k}.weight"
            if r_k == 0:
                a_list.append(mx.zeros((0, n_cols)))
                b_list.append(mx.zeros((n_rows, 0)))
                continue
            missing = [key for key in (a_key, b_key) if key not in parts]
            if missing:
                raise MissingKeysError(f"{file}: module {path} lacks {', '.join(missing)} (block {k}, rank {r_k})")
            check_shape(f"{path}.{a_key}", parts[a_key].shape, (r_k, n_cols), file)
            check_shape(f"{path}.{b_key}", parts[b_key].shape, (n_rows, r_k), file)
            a_list.append(parts.pop(a_key))
            b_list.append(parts.pop(b_key))
        if parts:
            raise ConversionError(f"{file}: {path} has tensors for no block of rank > 0: {sorted(parts)}")
        modules[path] = SMoAModule(a_list, b_list, rows, cols)
    _warn_fragile(report)
    config.target_modules = sorted({block_relative(p) for p in modules})
    config.num_layers = num_layers_for(base, modules)
    return write_smoa(out, config, modules, src.fingerprint)
