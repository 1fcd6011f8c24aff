"""THE adapter folder: the one module that writes, reads, checks and applies adapters, for every fine_tune_type.

An adapter folder holds ``adapters.safetensors`` and ``adapter_config.json`` in mlx-lm's layout:

* ``fine_tune_type``: ``smoa`` or ``hira`` (this package's layer), ``lora`` or ``dora`` (mlx-lm's layers, so
  stock ``mlx_lm.load(adapter_path=...)`` reads them); mlx-lm's ``full`` fine-tunes are read too.
* ``num_layers`` and ``lora_parameters`` (``rank``, ``scale``, ``dropout``, ``keys``) as mlx-lm writes them;
  SMoA adapters add ``smoa_parameters`` (an :class:`~smoa_mlx.config.SMoAConfig`).
* ``base_fingerprint`` (:mod:`.fingerprint`): a sketch of the base weights the adapter was made on, checked on
  every load, so an adapter applied to another base with the same shapes is refused by name.
* ``model``: the base it was trained on (an absolute folder or a hub id); a relative path is taken relative
  to the adapter folder, never to the current directory (:func:`recorded_base`).

SMoA tensors, per adapted module path: ``smoa_a.<k>`` [r_k, |C_k|], ``smoa_b.<k>`` [|R_k|, r_k] and the spectral
``row_order`` / ``col_order`` (int32), so loading never reruns the spectral step. LoRA/DoRA: mlx-lm's ``lora_a``
[in, r], ``lora_b`` [r, out] and DoRA's ``m`` [out].

Reading goes through :func:`read_adapter` (the config) and :func:`read_weights` (the tensors), each value checked
by one function named for it (``check_kind``, ``check_lora_parameters``, ``check_smoa_parameters``,
``check_fingerprint_field``, ``check_recorded_base``, :func:`smoa_modules`, :func:`lora_modules`, and for every
factor tensor :func:`check_factor`: dtype and finiteness), all before any model is touched. Writing goes
through :func:`write_adapter`: weights and config staged together and renamed into place (:mod:`smoa_mlx.atomic`),
so a crash or a full disk leaves the previous adapter intact, or, while one adapter replaces another of another
shape, weights without a config (no adapter), never a mix of the two.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..atomic import safetensors_writer, text_writer, write_files
from ..config import SMoAConfig, resolve_ranks
from ..errors import (
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterTypeError,
    MissingKeysError,
    ShapeMismatchError,
)
from ..layer import SMoALinear, base_dims, check_base
from ..loading import EMBEDDED, HUB_ID
from ..spectral import split_sizes
from .apply import get_module, natural_key, replace_modules, smoa_layers
from .fingerprint import FINGERPRINT_KEY, check_fingerprint, fingerprint_modules

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SMOA_TYPES = ("smoa", "hira")
LORA_TYPES = ("lora", "dora")
FINE_TUNE_TYPES = SMOA_TYPES + LORA_TYPES  # what this package trains and writes
READABLE_TYPES = FINE_TUNE_TYPES + ("full",)  # mlx-lm full fine-tunes load as plain weights

PathLike = Union[str, os.PathLike]


# -- the SMoA tensors as plain data ------------------------------------------------------------------------
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
        return cut_groups(self.row_order, len(self.a))

    def col_groups(self) -> list[np.ndarray]:
        return cut_groups(self.col_order, len(self.a))

    def arrays(self, path: str) -> dict[str, mx.array]:
        """The tensors of this module as ``adapters.safetensors`` names them."""
        out = {}
        for k, (a, b) in enumerate(zip(self.a, self.b)):
            out[f"{path}.smoa_a.{k}"] = a
            out[f"{path}.smoa_b.{k}"] = b
        out[f"{path}.row_order"] = mx.array(np.asarray(self.row_order).astype(np.int32))
        out[f"{path}.col_order"] = mx.array(np.asarray(self.col_order).astype(np.int32))
        return out


def cut_groups(order: np.ndarray, blocks: int) -> list[np.ndarray]:
    """The K contiguous groups of a spectral order (``torch.tensor_split`` sizes)."""
    edges = np.cumsum([0] + split_sizes(len(order), blocks))
    return [order[s:e] for s, e in zip(edges[:-1], edges[1:])]


def layer_module(layer: SMoALinear) -> SMoAModule:
    return SMoAModule(list(layer.smoa_a), list(layer.smoa_b), np.asarray(layer.row_order), np.asarray(layer.col_order))


# -- adapter_config.json: the one builder ------------------------------------------------------------------
def lora_parameters(config: SMoAConfig, keys: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters`` for ``config``; ``keys`` are the in-block module paths (default the targets)."""
    keys = list(config.target_modules if keys is None else keys)
    return {"rank": config.rank, "scale": config.scale, "dropout": config.dropout, "keys": keys}


def adapter_config(
    kind: str,
    lora: Mapping[str, Any],
    num_layers: int,
    smoa: Optional[SMoAConfig] = None,
    fingerprint: Optional[dict] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The whole ``adapter_config.json`` of an adapter of ``kind``; ``extra`` adds fields (``model``, ``training``).

    ``smoa`` is required for smoa/hira and refused for lora/dora; hira means one block.
    """
    check_kind({"fine_tune_type": kind}, Path(ADAPTER_CONFIG), FINE_TUNE_TYPES)
    if (smoa is not None) != (kind in SMOA_TYPES):
        raise ValueError(f"adapter_config: fine_tune_type {kind!r} {'needs' if smoa is None else 'takes no'} SMoAConfig")
    if kind == "hira" and smoa.blocks != 1:
        raise AdapterTypeError(f"fine_tune_type hira is SMoA with one block; got blocks={smoa.blocks}")
    data = dict(extra or {})
    data.update({"fine_tune_type": kind, "num_layers": int(num_layers), "lora_parameters": dict(lora)})
    if smoa is not None:
        data["smoa_parameters"] = smoa.to_dict()
    if fingerprint:
        data[FINGERPRINT_KEY] = fingerprint
    return data


def config_text(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# -- writing ----------------------------------------------------------------------------------------------
def write_adapter(
    folder: PathLike,
    arrays: Mapping[str, mx.array],
    config: Optional[Mapping[str, Any]],
    weights_name: str = ADAPTER_WEIGHTS,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    """Write the weights (and, unless ``config`` is None, the config, last) all or nothing; returns the folder.

    ``weights_name`` other than ``adapters.safetensors`` writes a numbered checkpoint beside the adapter; the
    config goes only with the main file, as in mlx-lm. Two renames cannot be one atomic step, so a config already
    in the folder that would not describe the new weights (another adapter: :func:`_describes_the_same`) is removed
    once the new files are staged and before they are renamed: a kill in between leaves weights without a config,
    which every reader (mlx-lm's too) sees as no adapter, never new weights beside an old config.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if not arrays:
        raise MissingKeysError(f"{folder}: no adapter tensors to write")
    mx.eval(list(arrays.values()))
    writers = {weights_name: safetensors_writer(arrays, metadata or {"format": "mlx"})}
    retire = []
    if config is not None:
        writers[ADAPTER_CONFIG] = text_writer(config_text(config))
        if not _describes_the_same(folder / ADAPTER_CONFIG, config):
            retire.append(ADAPTER_CONFIG)
    return write_files(folder, writers, what="adapter", retire=retire)


# What a config records about the run rather than the weights: it may differ between two saves of one adapter
# (a --resume with another --steps-per-report) without the old config misdescribing the new weights.
_RUN_RECORD_KEYS = ("training",)


def _describes_the_same(file: Path, config: Mapping[str, Any]) -> bool:
    """Whether the config ``file`` (absent: trivially) says of its weights all that ``config`` says of the new
    ones (kind, shapes, scale, spectral settings, base and fingerprint): then new weights beside it load as they
    should, as within one training run. An unreadable file describes nothing."""
    if not file.exists():
        return True
    try:
        old = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(old, dict):
        return False
    new = json.loads(config_text(config))  # as it will be on disk: tuples as lists, keys as strings
    return all(old.get(k) == new.get(k) for k in set(old) | set(new) if k not in _RUN_RECORD_KEYS)


def adapter_arrays(model: nn.Module) -> dict[str, mx.array]:
    """Every tensor an SMoA adapter file holds, keyed by full module path."""
    out = {}
    for path, layer in smoa_layers(model).items():
        out.update(layer_module(layer).arrays(path))
    return out


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """mlx-lm's LoRA/DoRA layers of ``model`` (those that wrap a linear, which the fingerprint reads)."""
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return {path: m for path, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))}


def lora_arrays(model: nn.Module) -> dict[str, mx.array]:
    """The trainable LoRA/DoRA tensors (``lora_a``, ``lora_b``, ``m``), as mlx-lm saves them."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(
    model: nn.Module,
    path: PathLike,
    config: SMoAConfig,
    extra_config: Optional[dict] = None,
    weights_name: str = ADAPTER_WEIGHTS,
    fine_tune_type: str = "smoa",
    keys: Optional[list[str]] = None,
) -> Path:
    """Write the adapter in ``model`` into the folder ``path`` (created if needed); returns the folder.

    For every ``fine_tune_type``: smoa/hira (the model's :class:`~smoa_mlx.SMoALinear` layers), lora/dora
    (mlx-lm's layers; ``keys`` are their in-block paths). ``extra_config`` adds fields to the JSON (training
    arguments, the base model); a ``base_fingerprint`` of the adapted base weights is recorded unless
    ``extra_config`` brings one. ``weights_name`` writes a numbered checkpoint instead (weights only).
    """
    folder = Path(path)
    smoa = fine_tune_type in SMOA_TYPES
    layers = smoa_layers(model) if smoa else lora_layers(model)
    arrays = adapter_arrays(model) if smoa else lora_arrays(model)
    if not layers or not arrays:
        raise ValueError(f"save_adapter({folder}): the model has no {fine_tune_type} layers")
    config_data = None
    if weights_name == ADAPTER_WEIGHTS:
        extra = dict(extra_config or {})
        fingerprint = extra.pop(FINGERPRINT_KEY, None) or fingerprint_modules(layers)
        n_layers = len(getattr(model, "layers", [])) if config.num_layers < 0 else config.num_layers
        config_data = adapter_config(
            fine_tune_type, lora_parameters(config, keys), n_layers or -1, config if smoa else None, fingerprint, extra
        )
    metadata = {"format": "mlx", "adapter": "smoa"} if smoa else {"format": "mlx"}
    return write_adapter(folder, arrays, config_data, weights_name, metadata)


# -- reading: the config -----------------------------------------------------------------------------------
@dataclass
class AdapterFolder:
    """An adapter folder's ``adapter_config.json``, read and checked (the tensors are read on demand)."""

    folder: Path
    kind: str
    data: dict[str, Any]
    lora: Optional[dict[str, Any]]
    smoa: Optional[SMoAConfig]
    fingerprint: Optional[dict[str, Any]]
    base: Optional[str]

    @property
    def config_file(self) -> Path:
        return self.folder / ADAPTER_CONFIG

    @property
    def weights_file(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS


def file_not_folder(folder: Path) -> str:
    """What to tell a user who named a file where an adapter folder belongs (often the weights file itself)."""
    holder = f"; {folder.parent} is the folder that holds it" if folder.name.endswith(".safetensors") else ""
    return f"{folder} is a file: an adapter folder is expected{holder}"


def check_folder(path: PathLike) -> Path:
    folder = Path(path)
    if folder.is_file():
        raise AdapterNotFoundError(file_not_folder(folder))
    if not folder.is_dir():
        raise AdapterNotFoundError(f"adapter folder not found: {folder}")
    return folder


def read_json_object(file: Path) -> dict:
    """A JSON object from a file, with errors naming it (missing, unreadable, bad JSON, not an object)."""
    if not file.is_file():
        raise AdapterNotFoundError(f"no {file.name} in folder {file.parent}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def check_kind(data: dict, file: Path, kinds: Iterable[str] = READABLE_TYPES) -> str:
    """The ``fine_tune_type`` (mlx-lm's default: lora), refused unless one of ``kinds``; PEFT folders named."""
    kinds = tuple(kinds)
    if "peft_type" in data and "fine_tune_type" not in data:
        raise AdapterTypeError(
            f"{file}: a PEFT adapter (peft_type={data['peft_type']!r}), not an mlx-lm one: convert it with "
            "`python -m smoa_mlx.convert from-hira / from-peft / from-reference`"
        )
    kind = data.get("fine_tune_type", "lora")
    if kind not in READABLE_TYPES:
        raise AdapterTypeError(f"{file}: unknown fine_tune_type {kind!r} (known: {', '.join(READABLE_TYPES)})")
    if kind not in kinds:
        what = "an SMoA" if set(kinds) <= set(SMOA_TYPES) else "a " + "/".join(kinds)
        raise AdapterTypeError(f"{file}: fine_tune_type={kind!r} is not {what} adapter (expected {', '.join(kinds)})")
    return kind


def check_lora_parameters(data: dict, file: Path) -> dict[str, Any]:
    """mlx-lm's ``lora_parameters``: rank (int >= 1), scale (finite), dropout in [0, 1), keys (names or None)."""
    lp = data.get("lora_parameters")
    if not isinstance(lp, dict):
        raise AdapterFileError(f"{file}: lora_parameters must be an object with rank and scale, got {lp!r}")
    rank, scale, dropout = lp.get("rank"), lp.get("scale"), lp.get("dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterFileError(f"{file}: lora_parameters.rank must be an integer >= 1, got {rank!r}")
    for key, value in (("scale", scale), ("dropout", dropout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise AdapterFileError(f"{file}: lora_parameters.{key} must be a finite number, got {value!r}")
    keys = lp.get("keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise AdapterFileError(f"{file}: lora_parameters.keys must be a list of module names, got {keys!r}")
    num_layers = data.get("num_layers", -1)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise AdapterFileError(f"{file}: num_layers must be an integer, got {num_layers!r}")
    return lp


def check_smoa_parameters(data: dict, file: Path, kind: str) -> SMoAConfig:
    """``smoa_parameters`` as an :class:`SMoAConfig` (every value checked; hira needs one block)."""
    if "smoa_parameters" not in data:
        raise AdapterFileError(f"{file}: fine_tune_type={kind!r} but no smoa_parameters")
    config = SMoAConfig.from_dict(data["smoa_parameters"], name=lambda k: f"smoa_parameters.{k}", prefix=f"{file}: ")
    if kind == "hira" and config.blocks != 1:
        raise AdapterFileError(f"{file}: fine_tune_type 'hira' is SMoA with one block, smoa_parameters.blocks={config.blocks}")
    return config


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def check_fingerprint_field(data: dict, file: Path) -> Optional[dict]:
    """``base_fingerprint``: absent (nothing to check) or {version, modules: {path: {shape, rms, probes}}}, every
    value of the right type (a hand-edited or damaged one must fail here, naming the file, not in the comparison)."""
    fingerprint = data.get(FINGERPRINT_KEY)
    if fingerprint is None:
        return None
    modules = fingerprint.get("modules") if isinstance(fingerprint, dict) else None
    if not isinstance(modules, dict) or not all(
        isinstance(m, dict) and {"shape", "rms", "probes"} <= set(m) for m in modules.values()
    ):
        raise AdapterFileError(
            f"{file}: {FINGERPRINT_KEY} must be an object with 'modules' mapping paths to {{shape, rms, probes}}"
        )
    version = fingerprint.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterFileError(f"{file}: {FINGERPRINT_KEY}.version must be an integer, got {version!r}")
    for path, m in modules.items():
        where = f"{file}: {FINGERPRINT_KEY}.modules[{path!r}]"
        shape, probes = m["shape"], m["probes"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise AdapterFileError(f"{where}.shape must be two non-negative integers, got {shape!r}")
        if not _finite_number(m["rms"]) or m["rms"] < 0:
            raise AdapterFileError(f"{where}.rms must be a finite number >= 0, got {m['rms']!r}")
        if not (isinstance(probes, list) and probes and all(_finite_number(v) for v in probes)):
            raise AdapterFileError(f"{where}.probes must be a non-empty list of finite numbers")
    return fingerprint


def check_recorded_base(data: dict, file: Path) -> Optional[str]:
    """The ``model`` field: a string naming the base, or absent/null (the embedded default)."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise AdapterFileError(f"{file}: model must be a string (folder or hub id), got {model!r}")
    return model or None


def read_adapter(path: PathLike, kinds: Iterable[str] = READABLE_TYPES) -> AdapterFolder:
    """Read and check an adapter folder's config; ``kinds`` are the fine_tune_types the caller accepts.

    The weights file must exist too (it is read by :func:`read_weights`, when needed).
    """
    folder = check_folder(path)
    file = folder / ADAPTER_CONFIG
    data = read_json_object(file)
    kind = check_kind(data, file, kinds)
    lora = check_lora_parameters(data, file) if kind != "full" else None
    smoa = check_smoa_parameters(data, file, kind) if kind in SMOA_TYPES else None
    adapter = AdapterFolder(folder, kind, data, lora, smoa, check_fingerprint_field(data, file),
                            check_recorded_base(data, file))
    if not adapter.weights_file.is_file():
        raise AdapterNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {folder}")
    return adapter


def as_adapter(path: Union[PathLike, AdapterFolder], kinds: Iterable[str] = READABLE_TYPES) -> AdapterFolder:
    if isinstance(path, AdapterFolder):
        check_kind(path.data, path.config_file, kinds)
        return path
    return read_adapter(path, kinds)


# -- reading: the tensors ----------------------------------------------------------------------------------
def read_weights(file: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a missing or unreadable file raises naming it."""
    if not file.is_file():
        raise AdapterNotFoundError(f"no {file.name} in adapter folder {file.parent}")
    try:
        weights, metadata = mx.load(str(file), return_metadata=True)
    except Exception as e:  # MLX raises bare RuntimeError/ValueError for corrupt files
        raise AdapterFileError(f"{file}: truncated or not a safetensors file ({e})") from None
    return weights, dict(metadata or {})


def check_order(order: Any, n: Optional[int], what: str, file: Path) -> np.ndarray:
    """A spectral order: a 1-D integer permutation of range(n) (n = its own length when unknown)."""
    order = np.asarray(order)
    size = len(order) if order.ndim == 1 else -1
    if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer) or (n is not None and size != n) or not (
        np.array_equal(np.sort(order), np.arange(size))
    ):
        raise AdapterFileError(f"{file}: {what} must be an integer permutation of range({n if n is not None else size})")
    return order.astype(np.int64)


# Factors are trained in these; an integer or float64 file was not written by a trainer, and casting it silently
# would hide that (and float64 is not even computable on Apple GPUs).
FACTOR_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def check_factor(value: mx.array, what: str, file: Path) -> None:
    """A trained factor: a float32/float16/bfloat16 tensor holding no NaN or inf (a fused model would be NaN)."""
    if value.dtype not in FACTOR_DTYPES:
        raise AdapterFileError(f"{file}: {what} is {str(value.dtype).rpartition('.')[2]}; adapter factors are "
                               "float32, float16 or bfloat16")
    if value.size and not mx.isfinite(value).all().item():
        raise AdapterFileError(f"{file}: {what} holds NaN or inf values")


def check_smoa_factors(path: str, config: SMoAConfig, module: SMoAModule, file: Path) -> None:
    """Block count, per-block ranks and factor shapes against the config and the module's dimensions."""
    ranks = resolve_ranks(config.rank, config.blocks, config.branch_ranks, path)
    d_out, d_in = module.shape
    if config.blocks > min(d_out, d_in):
        raise ShapeMismatchError(f"{file}: {path} is {d_out}x{d_in}, too small for blocks={config.blocks}")
    sizes = zip(ranks, split_sizes(d_out, config.blocks), split_sizes(d_in, config.blocks))
    for k, (r_k, rows, cols) in enumerate(sizes):
        for what, value, want in (("smoa_a", module.a[k], (r_k, cols)), ("smoa_b", module.b[k], (rows, r_k))):
            if tuple(value.shape) != want:
                raise ShapeMismatchError(f"{file}: {path}.{what}.{k} has shape {tuple(value.shape)}, expected {want}")
            check_factor(value, f"{path}.{what}.{k}", file)


def smoa_modules(weights: Mapping[str, mx.array], config: SMoAConfig, file: Path) -> dict[str, SMoAModule]:
    """The SMoA tensors grouped per module and checked (keys, block count, orders, shapes), sorted by path."""
    parts: dict[str, dict] = {}
    for key, value in weights.items():
        head, _, leaf = key.rpartition(".")
        if leaf in ("row_order", "col_order"):
            parts.setdefault(head, {"a": {}, "b": {}})[leaf] = value
            continue
        path, _, kind = head.rpartition(".")
        if kind not in ("smoa_a", "smoa_b") or not leaf.isdigit():
            raise AdapterFileError(f"{file}: unexpected tensor {key!r} (not an SMoA adapter tensor)")
        parts.setdefault(path, {"a": {}, "b": {}})[kind[-1]][int(leaf)] = value
    modules = {}
    for path in sorted(parts, key=natural_key):
        p = parts[path]
        for kind in ("a", "b"):  # the count first: a config may claim a billion blocks
            if len(p[kind]) != config.blocks or sorted(p[kind]) != list(range(config.blocks)):
                raise MissingKeysError(
                    f"{file}: {path}.smoa_{kind} has blocks {sorted(p[kind])}, but {ADAPTER_CONFIG} says "
                    f"blocks={config.blocks}"
                )
        missing = [k for k in ("row_order", "col_order") if k not in p]
        if missing:
            raise MissingKeysError(f"{file}: {path} lacks {', '.join(missing)}")
        module = SMoAModule(
            a=[p["a"][k] for k in range(config.blocks)],
            b=[p["b"][k] for k in range(config.blocks)],
            row_order=check_order(p["row_order"], None, f"{path}.row_order", file),
            col_order=check_order(p["col_order"], None, f"{path}.col_order", file),
        )
        check_smoa_factors(path, config, module, file)
        modules[path] = module
    if not modules:
        raise MissingKeysError(f"{file}: holds no SMoA modules")
    return modules


LORA_LEAVES = ("lora_a", "lora_b", "m")


def lora_modules(weights: Mapping[str, mx.array], kind: str, rank: int, file: Path) -> dict[str, dict[str, mx.array]]:
    """mlx-lm LoRA/DoRA tensors grouped per module; each module's factors checked against ``rank``."""
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in LORA_LEAVES:
            raise AdapterFileError(f"{file}: unexpected tensor {key!r} (not a LoRA/DoRA adapter tensor)")
        modules.setdefault(path, {})[leaf] = value
    needed = ("lora_a", "lora_b") + (("m",) if kind == "dora" else ())
    for path, parts in sorted(modules.items()):
        missing = [n for n in needed if n not in parts]
        if missing:
            raise MissingKeysError(f"{file}: module {path} lacks {', '.join(missing)}")
        if kind != "dora" and "m" in parts:
            raise AdapterFileError(f"{file}: {path} has a DoRA magnitude but fine_tune_type is {kind!r}")
        a, b = parts["lora_a"], parts["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            raise ShapeMismatchError(
                f"{file}: {path}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not have rank {rank}"
            )
        if "m" in parts and tuple(parts["m"].shape) != (b.shape[1],):
            raise ShapeMismatchError(f"{file}: {path}.m has shape {tuple(parts['m'].shape)}, expected ({b.shape[1]},)")
        for leaf, value in parts.items():
            check_factor(value, f"{path}.{leaf}", file)
    if not modules:
        raise MissingKeysError(f"{file}: holds no adapter tensors")
    return modules


# -- the base model ---------------------------------------------------------------------------------------
def base_reference(model: Optional[str]) -> Optional[str]:
    """What to record as an adapter's base: an existing local folder as an absolute path, else as given."""
    if model is None or model == EMBEDDED:
        return model
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def recorded_base(adapter: AdapterFolder) -> Optional[str]:
    """The base the adapter names, for loading (None: the embedded default).

    A relative path is resolved against the adapter folder, never the current directory: the same command run
    from another folder must not pick up another model. A name that is neither such a folder nor a hub id is
    refused.
    """
    name = adapter.base
    if name is None or name == EMBEDDED:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    local = adapter.folder / path
    if local.exists():
        return str(local.resolve())
    if HUB_ID.match(name):
        return name
    raise AdapterError(
        f"{adapter.config_file}: model {name!r} is neither a folder relative to the adapter folder ({local} does "
        "not exist) nor a Hugging Face id; pass --model"
    )


def verify_base(model: nn.Module, fingerprint: Optional[dict], source: str) -> bool:
    """Check ``model`` against an adapter's recorded ``base_fingerprint``; False when none was recorded.

    Raises :class:`~smoa_mlx.errors.BaseModelMismatchError` naming the modules whose weights differ.
    """
    if not fingerprint:
        return False
    modules = {}
    for path in fingerprint.get("modules", {}):
        try:
            modules[path] = get_module(model, path)
        except KeyError:
            continue  # a module the model lacks: the tensor checks report it
    check_fingerprint(fingerprint, fingerprint_modules(modules), source)
    return True


# -- applying to a model ----------------------------------------------------------------------------------
def _base_modules(model: nn.Module, paths: Iterable[str], errors: list[str]) -> dict[str, nn.Module]:
    """``model``'s module at each path, an adapter wrapper looked through; a missing one is added to ``errors``."""
    found = {}
    for path in paths:
        try:
            module = get_module(model, path)
        except KeyError as e:
            errors.append(f"  {path}: {e.args[0]}")
            continue
        found[path] = module.linear if isinstance(module, SMoALinear) or hasattr(module, "lora_a") else module
    return found


def smoa_layers_for(
    model: nn.Module, config: SMoAConfig, modules: Mapping[str, SMoAModule], file: Path
) -> dict[str, SMoALinear]:
    """SMoA layers around ``model``'s modules holding the given factors; every mismatch reported at once."""
    errors, new = [], {}
    for path, base in _base_modules(model, modules, errors).items():
        module = modules[path]
        try:
            check_base(base, path)
            layer = SMoALinear.from_base(
                base, rank=config.rank, blocks=config.blocks, alpha=config.alpha, dropout=config.dropout,
                branch_ranks=config.branch_ranks, row_order=module.row_order, col_order=module.col_order, name=path,
            )
        except (TypeError, ValueError) as e:
            errors.append(f"  {e}")
            continue
        layer.smoa_a = [a.astype(ref.dtype) for a, ref in zip(module.a, layer.smoa_a)]
        layer.smoa_b = [b.astype(ref.dtype) for b, ref in zip(module.b, layer.smoa_b)]
        new[path] = layer
    if errors:
        raise ShapeMismatchError(f"adapter {file} does not fit {type(model).__name__}:\n" + "\n".join(errors))
    return new


def load_adapter(
    model: nn.Module,
    path: Union[PathLike, AdapterFolder],
    weights_name: str = ADAPTER_WEIGHTS,
    verify_base: bool = True,
) -> SMoAConfig:
    """Wrap the modules named in an SMoA/HiRA adapter with SMoA layers holding its factors; returns its config.

    Everything is checked before the model is touched: a mismatch raises with the module path, the tensor and
    both shapes, and leaves the model as it was. With ``verify_base`` (default) the base weights must match the
    fingerprint recorded at save time (:class:`~smoa_mlx.errors.BaseModelMismatchError` otherwise).
    """
    adapter = as_adapter(path, SMOA_TYPES)
    file = adapter.folder / weights_name
    weights, _ = read_weights(file)
    new = smoa_layers_for(model, adapter.smoa, smoa_modules(weights, adapter.smoa, file), file)
    if verify_base:
        _verify(model, adapter)
    model.freeze()
    replace_modules(model, new)
    return adapter.smoa


def _verify(model: nn.Module, adapter: AdapterFolder) -> bool:
    return verify_base(model, adapter.fingerprint, str(adapter.config_file))


def _check_lora_fits(model: nn.Module, kind: str, modules: Mapping[str, dict[str, mx.array]], file: Path) -> None:
    """LoRA/DoRA factors against the linears they will wrap (other module kinds are left to mlx-lm's check)."""
    errors = []
    for path, base in _base_modules(model, modules, errors).items():
        parts = modules[path]
        if isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            d_out, d_in = base_dims(base)
            if parts["lora_a"].shape[0] != d_in or parts["lora_b"].shape[1] != d_out:
                errors.append(
                    f"  {path}: lora_a {tuple(parts['lora_a'].shape)} / lora_b {tuple(parts['lora_b'].shape)} "
                    f"do not fit the layer's {d_out}x{d_in} weight"
                )
    if errors:
        raise ShapeMismatchError(f"{kind} adapter {file} does not fit {type(model).__name__}:\n" + "\n".join(errors))


def apply_adapter(model: nn.Module, path: Union[PathLike, AdapterFolder], verify_base: bool = True) -> AdapterFolder:
    """Load any adapter this package or mlx-lm writes into ``model`` (in place, layers live); returns it, read.

    SMoA/HiRA through :func:`load_adapter`; LoRA/DoRA/full through mlx-lm's own ``load_adapters``, after this
    module's checks of the tensors (for linears) and of the base fingerprint, so a wrong model is refused before
    it is changed. ``adapter.fingerprint`` is None when the adapter recorded none (nothing could be checked).
    """
    adapter = as_adapter(path)
    if adapter.kind in SMOA_TYPES:
        load_adapter(model, adapter, verify_base=verify_base)
    else:
        from mlx_lm.tuner.utils import load_adapters

        weights, _ = read_weights(adapter.weights_file)
        if adapter.kind in LORA_TYPES:
            modules = lora_modules(weights, adapter.kind, adapter.lora["rank"], adapter.weights_file)
            _check_lora_fits(model, adapter.kind, modules, adapter.weights_file)
        if verify_base:
            _verify(model, adapter)
        try:
            load_adapters(model, str(adapter.folder))
        except (ValueError, KeyError, AttributeError) as e:
            raise AdapterError(f"{adapter.kind} adapter {adapter.folder} does not fit the model: {e}") from e
    model.eval()
    return adapter
