"""The adapter: wrapping a model's linears with SMoA layers, and the adapter folder on disk.

- :mod:`.apply`: which modules get adapted (as mlx-lm selects them) and the swap to :class:`~smoa_mlx.SMoALinear`.
- :mod:`.folder`: THE adapter folder (``adapters.safetensors`` + ``adapter_config.json``) for every
  fine_tune_type (smoa, hira, lora, dora): writing, reading, checking, detecting the kind, applying to a model.
  Train, fuse, chat, generate, convert and this API all go through it.
- :mod:`.fingerprint`: the base model's numeric sketch an adapter carries, so it is refused on another base.
"""

from .apply import apply_smoa, get_module, replace_modules, shared_orders, smoa_layers, target_paths
from .fingerprint import FINGERPRINT_KEY, check_fingerprint, fingerprint_modules, fingerprint_weights
from .folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FINE_TUNE_TYPES,
    AdapterFolder,
    adapter_arrays,
    adapter_config,
    apply_adapter,
    load_adapter,
    read_adapter,
    read_weights,
    recorded_base,
    save_adapter,
    verify_base,
    write_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FINE_TUNE_TYPES",
    "FINGERPRINT_KEY",
    "AdapterFolder",
    "adapter_arrays",
    "adapter_config",
    "apply_adapter",
    "apply_smoa",
    "check_fingerprint",
    "fingerprint_modules",
    "fingerprint_weights",
    "get_module",
    "load_adapter",
    "read_adapter",
    "read_weights",
    "recorded_base",
    "replace_modules",
    "save_adapter",
    "shared_orders",
    "smoa_layers",
    "target_paths",
    "verify_base",
    "write_adapter",
]
