"""Turning a model's linears into SMoA layers: which modules (as mlx-lm selects them), their spectral orders, the swap."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ..config import SMoAConfig
from ..layer import SMoALinear, base_dims, dequantized_weight
from ..spectral import spectral_order


# -- module selection -------------------------------------------------------------------------------------
def _matches(key: str, targets: Iterable[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def _matching_modules(model: nn.Module, targets: Iterable[str], num_layers: int) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module whose name matches ``targets`` in the last ``num_layers`` blocks."""
    targets = list(targets)
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `layers`: not an mlx-lm language model")
    n = len(layers) if num_layers is None or num_layers < 0 else min(num_layers, len(layers))
    chosen = {id(m) for block in layers[len(layers) - n :] for _, m in block.named_modules()}
    return [(path, m) for path, m in model.named_modules() if id(m) in chosen and _matches(path, targets)]


def _split_matches(
    model: nn.Module, targets: Iterable[str], num_layers: int
) -> tuple[list[str], dict[str, list[str]]]:
    """(the matching paths SMoA wraps, in natural order; {type name: paths} of the matching modules with a weight
    that it cannot wrap). One walk and one test decide both, so that what is adapted and what is reported as left
    out stay the two sides of one split."""
    paths: list[str] = []
    unadapted: dict[str, list[str]] = {}
    for path, m in _matching_modules(model, targets, num_layers):
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            paths.append(path)
        elif hasattr(m, "weight"):
            unadapted.setdefault(type(m).__name__, []).append(path)
    return sorted(paths, key=natural_key), unadapted


def target_paths(model: nn.Module, targets: Iterable[str], num_layers: int = -1) -> list[str]:
    """Full module paths to adapt: matching linears in the last ``num_layers`` blocks, as mlx-lm selects them.

    ``num_layers=-1`` (or more than the model has) means every block.
    """
    return _split_matches(model, targets, num_layers)[0]


def unadapted_matches(model: nn.Module, targets: Iterable[str], num_layers: int = -1) -> dict[str, list[str]]:
    """{type name: paths} of modules whose names match ``targets`` but which SMoA cannot wrap: a mixture of experts'
    ``SwitchLinear`` (mlx-lm's LoRA adapts those, through LoRASwitchLinear), a ``BitLinear``... Why: they would
    otherwise be skipped without a word, and a user of an MoE model would train its attention alone unawares."""
    return _split_matches(model, targets, num_layers)[1]


def _describe(found: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(paths)} {kind} ({', '.join(sorted(paths, key=natural_key)[:2])}"
                     f"{', ...' if len(paths) > 2 else ''})" for kind, paths in found.items())


def natural_key(path: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def get_module(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"module {path!r} not found in {type(model).__name__} (failed at {part!r})") from None
    return node


def replace_modules(model: nn.Module, new: dict[str, nn.Module]) -> None:
    model.update_modules(tree_unflatten(list(new.items())))


# -- apply ------------------------------------------------------------------------------------------------
def apply_smoa(
    model: nn.Module,
    config: SMoAConfig,
    orders: Optional[dict[str, tuple]] = None,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> list[str]:
    """Freeze ``model`` and replace its target linears with :class:`SMoALinear`; returns the adapted paths.

    ``orders`` maps module paths to precomputed (row_order, col_order); by default they are computed here,
    shared across the ranks of ``mx.distributed`` when there are several (:func:`shared_orders`). ``progress``
    wraps the per-layer loop (``tqdm`` for instance): the spectral step is the slow part of setting up a big model.
    """
    paths, skipped = _split_matches(model, config.target_modules, config.num_layers)
    if not paths:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules} "
            + (f"in the last {config.num_layers} blocks" if config.num_layers >= 0 else "in any block")
            + (f"; SMoA wraps nn.Linear and nn.QuantizedLinear only, and these match: {_describe(skipped)}"
               if skipped else "")
        )
    if skipped:
        warnings.warn(
            f"SMoA wraps nn.Linear and nn.QuantizedLinear only: left unadapted, though they match "
            f"target_modules: {_describe(skipped)}. Adapting {len(paths)} linear layers.",
            UserWarning,
            stacklevel=2,
        )
    if orders is None:
        orders = shared_orders(model, paths, progress)
    model.freeze()
    new = {}
    for path in paths:
        row, col = orders.get(path, (None, None))
        new[path] = SMoALinear.from_base(
            get_module(model, path),
            rank=config.rank,
            blocks=config.blocks,
            alpha=config.alpha,
            dropout=config.dropout,
            branch_ranks=config.branch_ranks,
            row_order=row,
            col_order=col,
            name=path,
        )
    replace_modules(model, new)
    return paths


def shared_orders(
    model: nn.Module,
    paths: list[str],
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Spectral orders of ``paths``, each rank of ``mx.distributed`` computing its share (every world-size-th layer).

    The orders are a pure function of W0, so under data parallelism every rank would otherwise repeat the whole
    spectral step (minutes on a 7B model); here one ``all_sum`` of the stacked int32 orders hands every rank all of
    them. A collective call: every rank must make it. With one process it is a plain loop.
    """
    world = mx.distributed.init()
    dims = [base_dims(get_module(model, path)) for path in paths]
    mine = range(world.rank(), len(paths), world.size())
    local = {}
    for i in progress(mine) if progress else mine:
        local[i] = spectral_order(dequantized_weight(get_module(model, paths[i])))
    if world.size() == 1:
        return {paths[i]: orders for i, orders in local.items()}
    offsets = np.cumsum([0] + [d_out + d_in for d_out, d_in in dims])
    flat = np.zeros(int(offsets[-1]), dtype=np.int32)
    for i, (rows, cols) in local.items():
        flat[offsets[i] : offsets[i] + dims[i][0]] = rows
        flat[offsets[i] + dims[i][0] : offsets[i + 1]] = cols
    summed = np.array(mx.distributed.all_sum(mx.array(flat), group=world))
    return {
        path: (summed[offsets[i] : offsets[i] + d_out], summed[offsets[i] + d_out : offsets[i + 1]])
        for i, (path, (d_out, _)) in enumerate(zip(paths, dims))
    }


def smoa_layers(model: nn.Module) -> dict[str, SMoALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SMoALinear)}
