"""Save / load SMoA adapters in mlx-lm's folder layout.

Layout: ``adapters.safetensors`` holds, per adapted module path (``model.layers.0.self_attn.q_proj``),
``smoa_a.<k>`` [r_k, |C_k|], ``smoa_b.<k>`` [|R_k|, r_k] and the spectral ``row_order`` / ``col_order``
(int32), so loading never reruns the spectral step. ``adapter_config.json`` follows mlx-lm's
(``fine_tune_type``, ``num_layers``, ``lora_parameters``) and adds ``smoa_parameters`` (an :class:`SMoAConfig`).
Files are written to a temporary name and renamed, so a crash mid-save leaves the previous adapter intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..config import SMoAConfig
from ..layer import SMoALinear, check_base
from .apply import get_module, replace_modules, smoa_layers
from .fingerprint import FINGERPRINT_KEY, check_fingerprint, fingerprint_modules

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FINE_TUNE_TYPES = ("smoa", "hira")

PathLike = Union[str, os.PathLike]


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
    replace_modules(model, new)
    return config
