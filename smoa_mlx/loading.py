"""The one model-loading entry point of train, fuse, chat and generate.

``--model`` absent means the embedded SmolLM2-135M-Instruct (works offline, no download); anything else goes to
``mlx_lm.load`` unchanged (hub ids on a Mac, local folders, quantized models), so the commands accept exactly what
mlx-lm's own commands accept. Adapters are dispatched on their ``fine_tune_type``: SMoA/HiRA through
:func:`smoa_mlx.load_adapter`, LoRA/DoRA/full through mlx-lm's own loader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINE_TUNE_TYPES, load_adapter, read_json_object
from .models.embedded import EMBEDDED_NAME, embedded_gguf_path, gguf_model

PathLike = Union[str, Path]

EMBEDDED = "embedded"  # an explicit name for the default, for configs and adapter_config.json
MLX_LM_TYPES = ("lora", "dora", "full")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_embedded(model: Optional[str]) -> bool:
    return model is None or model == EMBEDDED


def describe_model(model: Optional[str]) -> str:
    """A human name for logs and summaries."""
    return EMBEDDED_NAME if is_embedded(model) else str(model)


def load_model(
    model: Optional[str] = None,
    *,
    dtype: Optional[mx.Dtype] = None,
    quantized: bool = False,
    tokenizer_config: Optional[dict[str, Any]] = None,
    model_config: Optional[dict[str, Any]] = None,
    lazy: bool = False,
    return_config: bool = False,
) -> Union[tuple[nn.Module, TokenizerWrapper], tuple[nn.Module, TokenizerWrapper, dict[str, Any]]]:
    """``(model, tokenizer)`` (plus the config.json dict with ``return_config``, which fuse needs to save).

    ``model``: None or ``"embedded"`` for the embedded default, else a local mlx-lm folder or a hub id.
    ``dtype``: cast the floating weights (the embedded model defaults to float32; a hub model keeps its own
    dtype unless given, e.g. ``mx.float32`` for a bfloat16 checkpoint on a CPU, where bfloat16 is unusable).
    ``quantized``: keep the embedded model in its native 4-bit form (mlx-lm models are as stored anyway).
    """
    if is_embedded(model):
        if tokenizer_config or model_config:
            raise ValueError("tokenizer_config/model_config apply to mlx-lm models, not the embedded default")
        loaded, tokenizer, config = gguf_model(embedded_gguf_path(), dtype=dtype or mx.float32, quantized=quantized)
    else:
        loaded, tokenizer, config = _load_mlx_lm(str(model), tokenizer_config, model_config, lazy)
        if dtype is not None:
            loaded.set_dtype(dtype)  # floating parameters only: packed quantized weights stay as they are
            config = {**config, "torch_dtype": str(dtype).rpartition(".")[2]}
    return (loaded, tokenizer, config) if return_config else (loaded, tokenizer)


def _load_mlx_lm(model: str, tokenizer_config, model_config, lazy: bool):
    import mlx_lm

    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"--model {model}: expected an mlx-lm model folder, got a file")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: no config.json in {local} (not an mlx-lm model folder)")
        model = str(local)
    elif not _HUB_ID.match(model):
        raise FileNotFoundError(f"--model {model}: no such folder, and not a Hugging Face id ('owner/name')")
    try:
        if not local.exists():
            # The snapshot mlx_lm.load would fetch itself (same function), fetched first so its config can be read.
            from mlx_lm.utils import _download

            model = str(_download(model))
        model_config = {**rope_config_fix(Path(model) / "config.json"), **(model_config or {})}
        return mlx_lm.load(
            model, tokenizer_config=tokenizer_config, model_config=model_config, lazy=lazy, return_config=True
        )
    except Exception as e:
        where = "folder" if local.exists() else "Hugging Face id (not found locally; is the hub reachable?)"
        # hub exceptions take extra constructor arguments, so re-raise as the nearest plain type
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError if isinstance(e, ValueError) else RuntimeError
        raise kind(f"--model {model}: could not load this {where}: {e}") from e


def rope_config_fix(config_path: Path) -> dict[str, Any]:
    """Overrides that let mlx-lm read the RoPE settings of a config.json written by transformers 5.

    transformers 5 keeps ``rope_theta`` (and any scaling) only inside ``rope_parameters``; mlx-lm 0.32's llama,
    qwen2, mistral... read the top-level keys and silently fall back to their defaults (10000 for llama, whose
    3.x checkpoints need 500000): the model loads, generates plausibly, and fine-tunes with the wrong positions.
    Returns {} when the top-level keys are there or the architecture reads ``rope_parameters`` itself.
    """
    import dataclasses
    import warnings

    from mlx_lm.utils import _get_classes

    try:
        config = read_json_object(config_path)
        args_class = _get_classes(config)[1]
    except Exception:  # noqa: BLE001 - mlx-lm reports an unreadable or unknown config itself, with its own words
        return {}
    rope = config.get("rope_parameters")
    fields = {f.name for f in dataclasses.fields(args_class)} if dataclasses.is_dataclass(args_class) else set()
    if not isinstance(rope, dict) or "rope_parameters" in fields or "rope_theta" not in fields:
        return {}
    fix: dict[str, Any] = {}
    if "rope_theta" not in config and "rope_theta" in rope:
        fix["rope_theta"] = rope["rope_theta"]
    if "rope_scaling" in fields and config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        fix["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if fix:
        warnings.warn(
            f"{config_path}: RoPE settings only inside 'rope_parameters' (transformers 5); passing "
            f"{sorted(fix)} to mlx-lm, which reads the top-level keys",
            stacklevel=3,
        )
    return fix


def read_adapter_kind(adapter_path: PathLike) -> tuple[str, dict[str, Any]]:
    """(fine_tune_type, the adapter_config.json contents), with errors naming the missing or bad file."""
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    file = folder / ADAPTER_CONFIG
    data = read_json_object(file)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {folder}")
    kind = data.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES + MLX_LM_TYPES:
        raise ValueError(f"{file}: unknown fine_tune_type {kind!r} (known: {', '.join(FINE_TUNE_TYPES + MLX_LM_TYPES)})")
    return kind, data


def apply_adapter(model: nn.Module, adapter_path: PathLike) -> str:
    """Load any adapter this project or mlx-lm writes into ``model`` (in place); returns its fine_tune_type."""
    kind, _ = read_adapter_kind(adapter_path)
    if kind in FINE_TUNE_TYPES:
        load_adapter(model, adapter_path)
    else:
        from mlx_lm.tuner.utils import load_adapters

        try:
            load_adapters(model, str(adapter_path))
        except (ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"{kind} adapter {adapter_path} does not fit the model: {e}") from e
    model.eval()
    return kind


def load_model_with_adapter(
    model: Optional[str], adapter_path: PathLike, **kw: Any
) -> Union[tuple[nn.Module, TokenizerWrapper], tuple[nn.Module, TokenizerWrapper, dict[str, Any]]]:
    """The base model with an adapter applied (layers live, not fused).

    ``model=None`` means the base the adapter was trained on, as its adapter_config.json records it (``model``
    field, written by mlx-lm and smoa_mlx.train), else the embedded default. Other keywords go to :func:`load_model`.
    """
    _, data = read_adapter_kind(adapter_path)  # fail on a bad adapter before spending time on the model
    if model is None:
        model = data.get("model") or None
    loaded = load_model(model, **kw)
    try:
        apply_adapter(loaded[0], adapter_path)
    except ValueError as e:
        raise ValueError(f"{e}\n(base model: {describe_model(model)})") from e
    return loaded
