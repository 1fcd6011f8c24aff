"""Apply SMoA to an mlx-lm model, and save / load adapters in mlx-lm's folder layout.

Layout: ``adapters.safetensors`` holds, per adapted module path (``model.layers.0.self_attn.q_proj``),
``smoa_a.<k>`` [r_k, |C_k|], ``smoa_b.<k>`` [|R_k|, r_k] and the spectral ``row_order`` / ``col_order``
(int32), so loading never reruns the spectral step. ``adapter_config.json`` follows mlx-lm's
(``fine_tune_type``, ``num_layers``, ``lora_parameters``) and adds ``smoa_parameters`` (an :class:`SMoAConfig`).
Files are written to a temporary name and renamed, so a crash mid-save leaves the previous adapter intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import SMoAConfig
from .fingerprint import FINGERPRINT_KEY, check_fingerprint, fingerprint_modules
from .layer import SMoALinear, base_dims, check_base, dequantized_weight
from .spectral import spectral_order

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FINE_TUNE_TYPES = ("smoa", "hira")

PathLike = Union[str, os.PathLike]


# -- module selection -------------------------------------------------------------------------------------
def _matches(key: str, targets: Iterable[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def target_paths(model: nn.Module, targets: Iterable[str], num_layers: int = -1) -> list[str]:
    """Full module paths to adapt: matching linears in the last ``num_layers`` blocks, as mlx-lm selects them.

    ``num_layers=-1`` (or more than the model has) means every block.
    """
    targets = list(targets)
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `layers`: not an mlx-lm language model")
    n = len(layers) if num_layers is None or num_layers < 0 else min(num_layers, len(layers))
    chosen = {id(m) for block in layers[len(layers) - n :] for _, m in block.named_modules()}
    return sorted(
        (
            path
            for path, m in model.named_modules()
            if id(m) in chosen and isinstance(m, (nn.Linear, nn.QuantizedLinear)) and _matches(path, targets)
        ),
        key=_natural_key,
    )


def _natural_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def get_module(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"module {path!r} not found in {type(model).__name__} (failed at {part!r})") from None
    return node


def _replace_modules(model: nn.Module, new: dict[str, nn.Module]) -> None:
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
    paths = target_paths(model, config.target_modules, config.num_layers)
    if not paths:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules} "
            f"in the last {config.num_layers} blocks"
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
    _replace_modules(model, new)
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


# -- atomic files -----------------------------------------------------------------------------------------
def _publish(tmp: str, path: Path) -> None:
    """fsync, give the file the permissions a plain open() would, and rename it over ``path``."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(path: PathLike, arrays: dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    path = Path(path)
    # mx.save_safetensors insists on the .safetensors suffix, so the temporary name keeps it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- save / load ------------------------------------------------------------------------------------------
def adapter_arrays(model: nn.Module) -> dict[str, mx.array]:
    """Every tensor an SMoA adapter file holds, keyed by full module path."""
    out = {}
    for path, layer in smoa_layers(model).items():
        for k, (a, b) in enumerate(zip(layer.smoa_a, layer.smoa_b)):
            out[f"{path}.smoa_a.{k}"] = a
            out[f"{path}.smoa_b.{k}"] = b
        out[f"{path}.row_order"] = layer.row_order
        out[f"{path}.col_order"] = layer.col_order
    return out


def adapter_config_dict(config: SMoAConfig, extra: Optional[dict] = None, fine_tune_type: str = "smoa") -> dict:
    """mlx-lm's adapter_config.json fields, plus SMoA's own under ``smoa_parameters``."""
    data = dict(extra or {})
    data.update(
        {
            "fine_tune_type": fine_tune_type,
            "num_layers": config.num_layers,
            "lora_parameters": {
                "rank": config.rank,
                "scale": config.scale,
                "dropout": config.dropout,
                "keys": list(config.target_modules),
            },
            "smoa_parameters": config.to_dict(),
        }
    )
    return data


def save_adapter(
    model: nn.Module,
    path: PathLike,
    config: SMoAConfig,
    extra_config: Optional[dict] = None,
    weights_name: str = ADAPTER_WEIGHTS,
) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into the folder ``path`` (created if needed).

    ``extra_config`` adds fields to the JSON (training arguments, base model id); a ``base_fingerprint`` of the
    adapted base weights is recorded unless ``extra_config`` brings its own. ``weights_name`` lets a
    trainer write numbered checkpoints (``0000100_adapters.safetensors``) beside the adapter.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = adapter_arrays(model)
    if not arrays:
        raise ValueError(f"save_adapter({folder}): the model has no SMoA layers")
    mx.eval(arrays)
    atomic_save_safetensors(folder / weights_name, arrays, metadata={"format": "mlx", "adapter": "smoa"})
    if weights_name == ADAPTER_WEIGHTS:
        extra = dict(extra_config or {})
        # Lets loaders and converters notice an adapter applied to another base (see fingerprint.py).
        if FINGERPRINT_KEY not in extra:
            extra[FINGERPRINT_KEY] = fingerprint_modules(smoa_layers(model))
        text = json.dumps(adapter_config_dict(config, extra), indent=2, sort_keys=True)
        atomic_write_text(folder / ADAPTER_CONFIG, text + "\n")
    return folder


def read_json_object(file: Path) -> dict:
    """A JSON object from an adapter folder's file, with errors naming the file (missing, bad JSON, not a dict)."""
    if not file.is_file():
        raise FileNotFoundError(f"no {file.name} in adapter folder {file.parent}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def read_adapter_config(path: PathLike) -> tuple[SMoAConfig, dict]:
    """(SMoAConfig, the whole JSON) of an adapter folder, with errors naming the file."""
    file = Path(path) / ADAPTER_CONFIG
    data = read_json_object(file)
    kind = data.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES or "smoa_parameters" not in data:
        raise ValueError(
            f"{file}: fine_tune_type={kind!r} is not an SMoA adapter "
            f"(expected one of {FINE_TUNE_TYPES} with 'smoa_parameters')"
        )
    try:
        return SMoAConfig.from_dict(data["smoa_parameters"]), data
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: bad smoa_parameters: {e}") from None


def _group_by_module(weights: dict[str, mx.array], file: Path) -> dict[str, dict]:
    modules: dict[str, dict] = {}
    for key, value in weights.items():
        head, _, leaf = key.rpartition(".")
        if leaf in ("row_order", "col_order"):
            modules.setdefault(head, {"a": {}, "b": {}})[leaf] = value
            continue
        path, _, kind = head.rpartition(".")
        if kind not in ("smoa_a", "smoa_b") or not leaf.isdigit():
            raise ValueError(f"{file}: unexpected tensor {key!r} (not an SMoA adapter tensor)")
        modules.setdefault(path, {"a": {}, "b": {}})[kind[-1]][int(leaf)] = value
    return modules


def _factor_mismatches(mpath: str, layer: SMoALinear, parts: dict) -> list[str]:
    errors = []
    for kind, have in (("a", layer.smoa_a), ("b", layer.smoa_b)):
        got = parts[kind]
        if sorted(got) != list(range(len(have))):
            errors.append(f"  {mpath}.smoa_{kind}: blocks {sorted(got)} in file, the layer has {len(have)}")
            continue
        for k, want in enumerate(have):
            if tuple(got[k].shape) != tuple(want.shape):
                errors.append(
                    f"  {mpath}.smoa_{kind}.{k}: adapter shape {tuple(got[k].shape)} does not match "
                    f"the layer's {tuple(want.shape)}"
                )
    return errors


def load_adapter(
    model: nn.Module, path: PathLike, weights_name: str = ADAPTER_WEIGHTS, verify_base: bool = True
) -> SMoAConfig:
    """Wrap the modules named in the adapter file with SMoA layers and load their factors.

    Everything is checked before the model is touched: a mismatch raises with the module path, the tensor and
    both shapes, and leaves the model as it was. With ``verify_base`` (default) the base weights must match the
    fingerprint recorded at save time (:class:`~smoa_mlx.fingerprint.BaseModelMismatchError` otherwise).
    """
    folder = Path(path)
    config, data = read_adapter_config(folder)
    file = folder / weights_name
    if not file.is_file():
        raise FileNotFoundError(f"no {weights_name} in adapter folder {folder}")
    modules = _group_by_module(mx.load(str(file)), file)
    errors, new = [], {}
    for mpath, parts in modules.items():
        try:
            base = get_module(model, mpath)
        except KeyError as e:
            errors.append(f"  {mpath}: {e.args[0]}")
            continue
        if isinstance(base, SMoALinear):
            base = base.linear
        try:
            check_base(base, mpath)
            if "row_order" not in parts or "col_order" not in parts:
                raise ValueError(f"{mpath}: row_order/col_order missing from {file.name}")
            layer = SMoALinear.from_base(
                base,
                rank=config.rank,
                blocks=config.blocks,
                alpha=config.alpha,
                dropout=config.dropout,
                branch_ranks=config.branch_ranks,
                row_order=parts["row_order"],
                col_order=parts["col_order"],
                name=mpath,
            )
        except (TypeError, ValueError) as e:
            errors.append(f"  {e}")
            continue
        mismatches = _factor_mismatches(mpath, layer, parts)
        if mismatches:
            errors.extend(mismatches)
            continue
        layer.smoa_a = [parts["a"][k].astype(a.dtype) for k, a in enumerate(layer.smoa_a)]
        layer.smoa_b = [parts["b"][k].astype(b.dtype) for k, b in enumerate(layer.smoa_b)]
        new[mpath] = layer
    if errors:
        raise ValueError(f"adapter {file} does not fit {type(model).__name__}:\n" + "\n".join(errors))
    if verify_base:
        # Shapes can match on another base of the same architecture; the groups and anchors would then be wrong.
        check_fingerprint(data.get(FINGERPRINT_KEY), fingerprint_modules(new), str(folder / ADAPTER_CONFIG))
    model.freeze()
    _replace_modules(model, new)
    return config
