"""The fine-tuning methods the trainer offers, behind one interface, so baselines share SMoA's training loop.

``smoa`` and ``hira`` (SMoA with one block) use this package's layer and adapter files; ``lora`` and ``dora`` use
mlx-lm's own layers (``linear_to_lora_layers``) and write adapters that ``mlx_lm.load(adapter_path=...)`` reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapters.apply import apply_smoa, target_paths
from ..adapters.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_arrays, load_adapter, save_adapter
from ..atomic import atomic_save_safetensors, atomic_write_text
from ..config import SMoAConfig

METHODS = ("smoa", "hira", "lora", "dora")
# Hadamard adapters scale the update by W0's own entries, so they need a far larger step than LoRA (PEFT's HiRA
# benchmark: 4.5e-3 against 1e-4 for LoRA); at LoRA's rate SMoA barely moves the loss.
DEFAULT_LEARNING_RATES = {"smoa": 2e-3, "hira": 2e-3, "lora": 2e-4, "dora": 2e-4}


@dataclass
class Method:
    """One adapter kind with its hyperparameters: apply it, save it, load it back for --resume."""

    kind: str
    config: SMoAConfig
    _keys: Optional[list] = field(default=None, init=False, repr=False)  # LoRA keys, known once applied

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise ValueError(f"--fine-tune-type must be one of {METHODS}, got {self.kind!r}")
        if self.kind == "hira" and self.config.blocks != 1:
            raise ValueError(f"--fine-tune-type hira is SMoA with one block; got --blocks {self.config.blocks}")

    @property
    def is_smoa(self) -> bool:
        return self.kind in ("smoa", "hira")

    def lora_parameters(self) -> dict[str, Any]:
        """mlx-lm's adapter fields. For LoRA/DoRA the keys are the in-block paths mlx-lm's loader matches."""
        keys = self._keys or list(self.config.target_modules)
        return {"rank": self.config.rank, "scale": self.config.scale, "dropout": self.config.dropout, "keys": keys}

    def _lora_keys(self, model: nn.Module) -> list[str]:
        """mlx-lm matches LoRA keys against paths inside a block (``self_attn.q_proj``): derive them from ours."""
        paths = target_paths(model, self.config.target_modules, self.config.num_layers)
        if not paths:
            raise ValueError(
                f"no module of {type(model).__name__} matches --target-modules {self.config.target_modules}"
            )
        return sorted({p.split(".", 3)[3] if p.startswith("model.layers.") else p for p in paths})

    def apply(self, model: nn.Module, progress=None) -> list[str]:
        """Freeze the model and insert trainable adapter layers; returns the adapted module paths."""
        if self.is_smoa:
            return apply_smoa(model, self.config, progress=progress)
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self._keys = self._lora_keys(model)
        model.freeze()
        num_layers = len(model.layers) if self.config.num_layers < 0 else self.config.num_layers
        linear_to_lora_layers(model, num_layers, self.lora_parameters(), use_dora=self.kind == "dora")
        return [k for k, _ in tree_flatten(model.trainable_parameters())]

    def adapter_config(self, model_layers: int, extra: Optional[dict] = None) -> dict[str, Any]:
        data = dict(extra or {})
        num_layers = model_layers if self.config.num_layers < 0 else self.config.num_layers
        data.update(
            {"fine_tune_type": self.kind, "num_layers": num_layers, "lora_parameters": self.lora_parameters()}
        )
        if self.is_smoa:
            data["smoa_parameters"] = self.config.to_dict()
        return data

    def weights(self, model: nn.Module) -> dict[str, mx.array]:
        if self.is_smoa:
            return adapter_arrays(model)
        return dict(tree_flatten(model.trainable_parameters()))

    def save(self, model: nn.Module, folder: Path, extra: Optional[dict] = None,
             weights_name: str = ADAPTER_WEIGHTS) -> None:
        """Atomic save; the config JSON is (re)written only with the main adapter file, as mlx-lm does."""
        folder.mkdir(parents=True, exist_ok=True)
        config = self.adapter_config(len(model.layers), extra)
        if self.is_smoa:
            save_adapter(model, folder, self.config, extra_config=config, weights_name=weights_name)
            if weights_name == ADAPTER_WEIGHTS:  # save_adapter writes "smoa"; keep "hira" when that was asked
                atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
            return
        arrays = self.weights(model)
        mx.eval(arrays)
        atomic_save_safetensors(folder / weights_name, arrays, metadata={"format": "mlx"})
        if weights_name == ADAPTER_WEIGHTS:
            atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def restore(self, model: nn.Module, folder: Path, weights_name: str) -> None:
        """Apply this method with the saved weights (for --resume). SMoA reads its spectral orders from the
        file instead of recomputing them."""
        if self.is_smoa:
            load_adapter(model, folder, weights_name=weights_name)
            return
        self.apply(model)
        model.load_weights(str(folder / weights_name), strict=False)
