"""The one model-loading entry point of train, fuse, chat and generate.

``--model`` absent means the embedded SmolLM2-135M-Instruct (works offline, no download); anything else goes to
``mlx_lm.load`` unchanged (hub ids on a Mac, local folders, quantized models), so the commands accept exactly what
mlx-lm's own commands accept. Adapters are the business of :mod:`smoa_mlx.adapters.folder`;
:func:`load_model_with_adapter` only joins the two.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .atomic import recover_folder
from .errors import AdapterError, HubUnreachableError, SMoAError
from .models.embedded import EMBEDDED_NAME, embedded_gguf_path, gguf_model

PathLike = Union[str, Path]

EMBEDDED = "embedded"  # an explicit name for the default, for configs and adapter_config.json
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    recover_folder(local)  # a fuse --force killed mid-replacement leaves the previous model aside: put it back
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"--model {model}: expected an mlx-lm model folder, got a file")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"--model {model}: no config.json in {local} (not an mlx-lm model folder)")
        model = str(local)
    elif not HUB_ID.match(model):
        raise FileNotFoundError(f"--model {model}: no such folder, and not a Hugging Face id ('owner/name')")
    if not local.exists():
        # The snapshot mlx_lm.load would fetch itself (same function), fetched first so its config can be read.
        from mlx_lm.utils import _download

        model = str(fetch_from_hub(_download, model, "--model"))
    try:
        model_config = {**rope_config_fix(Path(model) / "config.json"), **(model_config or {})}
        return mlx_lm.load(
            model, tokenizer_config=tokenizer_config, model_config=model_config, lazy=lazy, return_config=True
        )
    except Exception as e:
        where = "folder" if local.exists() else "Hugging Face id (not found locally; is the hub reachable?)"
        # hub exceptions take extra constructor arguments, so re-raise as the nearest plain type
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError if isinstance(e, ValueError) else RuntimeError
        raise kind(f"--model {model}: could not load this {where}: {e}") from e


def fetch_from_hub(download: Callable[..., Any], name: str, flag: str, hint: str = "", **kw: Any) -> Path:
    """``download(name, **kw)`` (a hub snapshot, from the local cache when it is there), its failures in one line
    naming the flag: an unreachable hub (offline, proxy) says so and what to pass instead, not a ConnectError."""
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(download(name, **kw))
    except LocalEntryNotFoundError:
        raise HubUnreachableError(
            f"{flag} {name}: no such local folder, and the Hugging Face hub cannot be reached (offline?) nor does "
            f"the local cache hold it. Pass a local model folder to {flag}{hint}."
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{flag} {name}: no such local folder, and no such model on the Hugging Face hub "
                                "(or it is private: log in with `hf auth login`)") from None
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; name the flag and the cause
        raise HubUnreachableError(f"{flag} {name}: downloading it from the Hugging Face hub failed: {e}") from None


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
        config = json.loads(config_path.read_text())
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


def load_model_with_adapter(
    model: Optional[str],
    adapter_path: PathLike,
    log: Optional[Callable[[str], None]] = None,
    **kw: Any,
) -> Union[tuple[nn.Module, TokenizerWrapper], tuple[nn.Module, TokenizerWrapper, dict[str, Any]]]:
    """The base model with an adapter applied (layers live, not fused), the base checked against the adapter.

    ``model=None`` means the base the adapter was trained on, as its adapter_config.json records it (a relative
    path there is relative to the adapter folder), else the embedded default. ``log`` receives one line saying
    which base was used and whether its fingerprint was checked. Other keywords go to :func:`load_model`.
    """
    from .adapters.folder import apply_adapter, read_adapter, recorded_base

    adapter = read_adapter(adapter_path)  # fail on a bad adapter before spending time on the model
    source = "given by --model" if model is not None else f"recorded in {adapter.config_file}"
    if model is None:
        model = recorded_base(adapter)
    loaded = load_model(model, **kw)
    try:
        apply_adapter(loaded[0], adapter)
    except ValueError as e:
        kind = type(e) if isinstance(e, SMoAError) else AdapterError
        raise kind(f"{e}\n(base model: {describe_model(model)}, {source})") from e
    if log is not None:
        checked = "base fingerprint checked" if adapter.fingerprint else "no base fingerprint recorded: not checked"
        log(f"Base model: {describe_model(model)} ({source}; {checked})")
    return loaded
