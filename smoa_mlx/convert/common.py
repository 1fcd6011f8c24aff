"""What every conversion shares: reading and writing adapter folders, the base model checks, PEFT configs.

Each conversion reads everything and checks it before the first byte is written, then writes the weights and the
config with the foundation's atomic helpers: a failed conversion leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..adapters.apply import get_module
from ..adapters.fingerprint import FINGERPRINT_KEY, fingerprint_modules
from ..adapters.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SMOA_TYPES,
    AdapterFolder,
    SMoAModule,
    adapter_config,
    check_fingerprint_field,
    lora_parameters,
    read_adapter,
    read_json_object,
    read_weights,
    smoa_modules,
    verify_base as verify_fingerprint,
    write_adapter,
)
from ..config import SMoAConfig
from ..errors import (
    AdapterFileError,
    AdapterTypeError,
    BaseModelMismatchError,
    ConversionError,
    MissingKeysError,
    SavePathExistsError,
    ShapeMismatchError,
)
from ..folder_lock import folder_contents
from ..layer import base_dims as linear_dims, dequantized_weight
from .names import PEFT_PREFIX, layer_index, to_hf, to_mlx

PathLike = Union[str, os.PathLike]
PEFT_WEIGHTS = "adapter_model.safetensors"
# The fingerprint rides in the safetensors metadata of PEFT files: PEFT warns about unknown config keys.
METADATA_FINGERPRINT = "smoa_mlx.base_fingerprint"


# -- reading ----------------------------------------------------------------------------------------------
def read_peft(folder: PathLike, peft_type: str) -> tuple[dict, dict[str, mx.array], dict[str, str]]:
    """(config, weights, metadata) of a PEFT-style folder whose ``peft_type`` must be ``peft_type``."""
    folder = Path(folder)
    config = read_json_object(folder / ADAPTER_CONFIG)
    found = config.get("peft_type", config.get("fine_tune_type"))
    if str(found).upper() != peft_type:
        hint = " (an mlx-lm adapter folder)" if "fine_tune_type" in config else ""
        raise AdapterTypeError(f"{folder / ADAPTER_CONFIG}: peft_type is {found!r}{hint}, expected {peft_type!r}")
    if config.get("fan_in_fan_out"):
        raise ConversionError(f"{folder / ADAPTER_CONFIG}: fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported")
    weights, metadata = read_weights(folder / PEFT_WEIGHTS)
    return config, weights, metadata


def read_smoa(folder: PathLike, base: Optional[nn.Module] = None) -> tuple[AdapterFolder, dict[str, SMoAModule]]:
    """An SMoA adapter folder read and checked (its shapes against ``base`` too, and its base fingerprint)."""
    adapter = read_adapter(folder, SMOA_TYPES)
    weights, _ = read_weights(adapter.weights_file)
    modules = smoa_modules(weights, adapter.smoa, adapter.weights_file)
    for path, module in modules.items():
        dims = base_dims(base, path)
        if dims is not None and dims != module.shape:
            raise ShapeMismatchError(
                f"{adapter.weights_file}: {path} is {module.shape[0]}x{module.shape[1]}, the base layer {dims}"
            )
    verify_base(base, adapter.fingerprint, str(adapter.folder))
    return adapter, modules


def group_peft(
    weights: dict[str, mx.array], file: Path, leaf_pattern: str, model_type: str
) -> dict[str, dict[str, mx.array]]:
    """{mlx-lm module path: {leaf: tensor}} from PEFT keys ``base_model.model.<hf path>.<leaf>``.

    ``leaf_pattern`` is a regex of the tensor names after the module path (``lora_[AB]\\.weight``).
    """
    regex = re.compile(re.escape(PEFT_PREFIX) + r"(.+?)\.(" + leaf_pattern + ")")
    out: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        m = regex.fullmatch(key)
        if m is None:
            expected = f"{PEFT_PREFIX}<module>.<{leaf_pattern}>"
            raise ConversionError(f"{file}: unexpected tensor {key!r} (expected {expected})")
        out.setdefault(to_mlx(m.group(1), model_type), {})[m.group(2)] = value
    if not out:
        raise MissingKeysError(f"{file}: holds no adapter tensors")
    return out


def saved_base_layers(
    weights: dict[str, mx.array], base: Optional[nn.Module], model_type: str, file: Path
) -> dict[str, mx.array]:
    """Drop the copies of base weights PEFT saves for lm_head / embedding targets, after checking them.

    They are the base weights the adapter was trained with, so with a ``base`` they double as a fingerprint.
    """
    kept = {}
    for key, value in weights.items():
        if not key.endswith(".base_layer.weight"):
            kept[key] = value
            continue
        path = to_mlx(key[len(PEFT_PREFIX) : -len(".base_layer.weight")], model_type)
        if base is None:
            continue
        dims = base_dims(base, path)
        module = get_module(base, path)
        mine = dequantized_weight(getattr(module, "linear", module)).astype(mx.float32)
        atol = 0.05 * (float(mx.abs(mine).max().item()) or 1.0)  # loose enough for a quantized base
        if tuple(value.shape) != dims or not mx.allclose(value.astype(mx.float32), mine, atol=atol).item():
            raise BaseModelMismatchError(f"{file}: the saved base weight {key} differs from the base model's {path}")
    return kept


@dataclass
class PeftInput:
    """A PEFT-style adapter folder read and checked: its config, tensors per mlx-lm module path, fingerprint."""

    config: dict
    modules: dict[str, dict[str, mx.array]]
    fingerprint: Optional[dict]
    file: Path
    model_type: str


def open_peft(
    adapter: PathLike, peft_type: str, leaf_pattern: str, base: Optional[nn.Module], model_type: Optional[str]
) -> PeftInput:
    """Read a PEFT folder of ``peft_type``, map its module paths to mlx-lm's and check the base model's identity."""
    adapter = Path(adapter)
    model_type = resolve_model_type(base, model_type)
    config, weights, metadata = read_peft(adapter, peft_type)
    file = adapter / PEFT_WEIGHTS
    modules = group_peft(saved_base_layers(weights, base, model_type, file), file, leaf_pattern, model_type)
    fingerprint = metadata_fingerprint(metadata, file)
    verify_base(base, fingerprint, str(adapter))
    return PeftInput(config, modules, fingerprint or base_fingerprint(base, modules), file, model_type)


def require(parts: dict, names: Iterable[str], path: str, file: Path) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise MissingKeysError(f"{file}: module {path} lacks {', '.join(missing)}")


# -- the base model ---------------------------------------------------------------------------------------
def resolve_model_type(base: Optional[nn.Module], model_type: Optional[str]) -> str:
    found = getattr(base, "model_type", None) or getattr(getattr(base, "args", None), "model_type", None)
    if model_type and found and model_type != found:
        raise ConversionError(f"model_type {model_type!r} given, but the base model is a {found!r}")
    if not (model_type or found):
        raise ConversionError("the model type is unknown: pass model_type (CLI: --model-type) or a base model")
    return model_type or found


def base_dims(base: Optional[nn.Module], path: str) -> Optional[tuple[int, int]]:
    """(d_out, d_in) of the base layer at ``path`` (adapter wrappers looked through); None without a base."""
    if base is None:
        return None
    try:
        module = get_module(base, path)
    except KeyError as e:
        raise ShapeMismatchError(f"the base model has no module {path!r} ({e.args[0]})") from None
    module = getattr(module, "linear", module)
    if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        raise ShapeMismatchError(f"base module {path!r} is a {type(module).__name__}, not a linear layer")
    return linear_dims(module)


def check_shape(what: str, got: tuple, want: tuple, file: Path) -> None:
    if tuple(got) != tuple(want):
        raise ShapeMismatchError(f"{file}: {what} has shape {tuple(got)}, expected {tuple(want)}")


def base_fingerprint(base: Optional[nn.Module], paths: Iterable[str]) -> Optional[dict]:
    if base is None:
        return None
    return fingerprint_modules({p: get_module(base, p) for p in paths})


def verify_base(base: Optional[nn.Module], stored: Optional[dict], source: str) -> None:
    """Fingerprint check of the base against what the adapter recorded (nothing to do without either)."""
    if base is not None:
        verify_fingerprint(base, stored, source)


def metadata_fingerprint(metadata: dict[str, str], file: Path) -> Optional[dict]:
    """The base fingerprint a PEFT file written here carries in its metadata, checked as the adapter reader does."""
    text = metadata.get(METADATA_FINGERPRINT)
    if not text:
        return None
    try:
        fingerprint = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterFileError(f"{file}: metadata {METADATA_FINGERPRINT} is not valid JSON ({e})") from None
    return check_fingerprint_field({FINGERPRINT_KEY: fingerprint}, file)


def num_layers_for(base: Optional[nn.Module], paths: Iterable[str]) -> int:
    """mlx-lm's ``num_layers`` (counted from the last block) covering every path; -1 (all) without a base."""
    layers = getattr(base, "layers", None)
    indices = [layer_index(p) for p in paths if layer_index(p) >= 0]
    if layers is None or not indices:
        return -1
    return len(layers) - min(indices)


def distinct(adapter: PathLike, out: PathLike, force: bool = False) -> None:
    """Refuse an output folder that would lose something: the input folder (both formats name their config
    adapter_config.json), or, without ``force``, a folder that holds anything (another adapter would be left half
    replaced, its weights beside the new config), as fuse and train refuse theirs."""
    out = Path(out)
    if out.resolve() == Path(adapter).resolve():
        raise ConversionError(f"output folder {out} is the input folder: choose another one")
    if out.exists() and not out.is_dir():
        raise SavePathExistsError(f"output folder {out} exists and is not a folder")
    held = folder_contents(out)  # the lock of this conversion is not content
    if held and not force:
        listed = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise SavePathExistsError(f"output folder {out} already holds {listed}; pass --force to replace the adapter "
                                  "in it, or choose another folder")


def write_converted(
    folder: PathLike, arrays: dict[str, mx.array], config: dict, weights_name: str, metadata: dict[str, str]
) -> Path:
    """Write the converted adapter (all or nothing), then remove the other format's weights file that a forced
    conversion into an adapter folder leaves behind, so the folder holds one loadable adapter."""
    out = write_adapter(folder, arrays, config, weights_name, metadata)
    for name in (ADAPTER_WEIGHTS, PEFT_WEIGHTS):
        if name != weights_name:
            (out / name).unlink(missing_ok=True)
    return out


# -- writing ----------------------------------------------------------------------------------------------
def write_peft(
    folder: PathLike,
    peft_type: str,
    rank: int,
    arrays: dict[tuple[str, str], mx.array],
    paths: Iterable[str],
    model_type: str,
    fingerprint: Optional[dict],
    base: Optional[nn.Module] = None,
    **fields: Any,
) -> Path:
    """A stock PEFT adapter folder from {(mlx path, suffix): tensor}. The config's target_modules lists the exact
    module paths of ``paths`` so nothing else gets wrapped; ``fields`` are the method's own config fields. The base
    fingerprint is the source's when it has one, else ``base``'s (None without a base)."""
    hf_paths = sorted(to_hf(p, model_type) for p in paths)
    config = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": int(rank),
        "target_modules": hf_paths,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        **fields,
    }
    weights = {f"{PEFT_PREFIX}{to_hf(path, model_type)}.{suffix}": v for (path, suffix), v in arrays.items()}
    fingerprint = fingerprint or base_fingerprint(base, paths)
    metadata = {"format": "pt"}
    if fingerprint:
        metadata[METADATA_FINGERPRINT] = json.dumps(fingerprint, sort_keys=True)
    return write_converted(folder, weights, config, PEFT_WEIGHTS, metadata)


def write_smoa(folder: PathLike, config: SMoAConfig, modules: dict[str, SMoAModule], fingerprint: Optional[dict]) -> Path:
    """An SMoA adapter folder (what :func:`smoa_mlx.save_adapter` writes) from plain data."""
    arrays = {}
    for path, module in modules.items():
        arrays.update(module.arrays(path))
    cfg = adapter_config("smoa", lora_parameters(config), config.num_layers, config, fingerprint)
    return write_converted(folder, arrays, cfg, ADAPTER_WEIGHTS, {"format": "mlx", "adapter": "smoa"})


def to_numpy(x: mx.array) -> np.ndarray:
    return np.asarray(x.astype(mx.float32)) if x.dtype == mx.bfloat16 else np.asarray(x)
