"""The fine-tuning methods the trainer offers, behind one interface, so baselines share SMoA's training loop.

``smoa`` and ``hira`` (SMoA with one block) use this package's layer; ``lora`` and ``dora`` use mlx-lm's own
layers (``linear_to_lora_layers``), whose adapters ``mlx_lm.load(adapter_path=...)`` reads. Every method saves and
restores through the adapter folder's one owner, :mod:`smoa_mlx.adapters.folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapters.apply import apply_smoa, target_paths
from ..adapters.fingerprint import FINGERPRINT_KEY, fingerprint_modules
from ..adapters.folder import (
    ADAPTER_WEIGHTS,
    FINE_TUNE_TYPES,
    SMOA_TYPES,
    load_adapter,
    lora_layers,
    lora_parameters,
    read_adapter,
    read_weights,
    save_adapter,
    smoa_layers,
    verify_base,
)
from ..config import SMoAConfig
from ..errors import AdapterError

METHODS = FINE_TUNE_TYPES
# Hadamard adapters scale the update by W0's own entries, so they need a far larger step than LoRA (PEFT's HiRA
# benchmark: 4.5e-3 against 1e-4 for LoRA); at LoRA's rate SMoA barely moves the loss.
DEFAULT_LEARNING_RATES = {"smoa": 2e-3, "hira": 2e-3, "lora": 2e-4, "dora": 2e-4}


@dataclass
class Method:
    """One adapter kind with its (already checked) hyperparameters: apply it, save it, restore it for --resume."""

    kind: str
    config: SMoAConfig
    _keys: Optional[list] = field(default=None, init=False, repr=False)  # LoRA keys, known once applied
    _fingerprint: Optional[dict] = field(default=None, init=False, repr=False)  # the base's, taken once

    @property
    def is_smoa(self) -> bool:
        return self.kind in SMOA_TYPES

    def _lora_keys(self, model: nn.Module) -> list[str]:
        """mlx-lm matches LoRA keys against paths inside a block (``self_attn.q_proj``): derive them from ours."""
        paths = target_paths(model, self.config.target_modules, self.config.num_layers)
        if not paths:
            raise ValueError(
                f"no module of {type(model).__name__} matches --target-modules {self.config.target_modules}"
            )
        return sorted({p.split(".", 3)[3] if p.startswith("model.layers.") else p for p in paths})

    def apply(self, model: nn.Module, progress: Optional[Callable[[Iterable], Iterable]] = None) -> list[str]:
        """Freeze the model and insert trainable adapter layers; returns the adapted module paths."""
        if self.is_smoa:
            return apply_smoa(model, self.config, progress=progress)
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self._keys = self._lora_keys(model)
        model.freeze()
        num_layers = len(model.layers) if self.config.num_layers < 0 else self.config.num_layers
        linear_to_lora_layers(model, num_layers, lora_parameters(self.config, self._keys), use_dora=self.kind == "dora")
        return [k for k, _ in tree_flatten(model.trainable_parameters())]

    def save(self, model: nn.Module, folder: Path, extra: Optional[dict] = None,
             weights_name: str = ADAPTER_WEIGHTS) -> None:
        """Atomic save; the config JSON (with the base fingerprint) only with the main adapter file, as mlx-lm."""
        if self._fingerprint is None:  # the base does not change during training: sketch it once
            self._fingerprint = fingerprint_modules(smoa_layers(model) if self.is_smoa else lora_layers(model))
        extra = {**(extra or {}), FINGERPRINT_KEY: self._fingerprint}
        save_adapter(model, folder, self.config, extra, weights_name, self.kind, keys=self._keys)

    def restore(self, model: nn.Module, folder: Path, weights_name: str) -> None:
        """Apply this method with the saved weights (for --resume), checked against the model and its base.
        SMoA reads its spectral orders from the file instead of recomputing them."""
        if self.is_smoa:
            load_adapter(model, folder, weights_name=weights_name)
            return
        adapter = read_adapter(folder, (self.kind,))
        verify_base(model, adapter.fingerprint, str(adapter.config_file))
        weights, _ = read_weights(folder / weights_name)
        self.apply(model)
        params = dict(tree_flatten(model.trainable_parameters()))
        bad = sorted(k for k, v in weights.items() if k not in params or params[k].shape != v.shape)
        missing = sorted(set(params) - set(weights))
        if bad or missing:
            raise AdapterError(
                f"{folder / weights_name} does not fit this {self.kind} run: unexpected or misshapen {bad[:4]}, "
                f"missing {missing[:4]}"
            )
        model.load_weights(list(weights.items()), strict=False)
