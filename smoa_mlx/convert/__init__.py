"""Adapters to and from PyTorch: reference SMoA, stock PEFT (HiRA, LoRA, DoRA), and fused Hugging Face models.

The MLX side never needs torch: PEFT folders are plain safetensors + JSON. torch/peft are only needed to *use* the
converted files (and by :mod:`smoa_mlx.convert.torch_reference`, imported lazily).

- :mod:`.peft_hira`, :mod:`.peft_lora`, :mod:`.reference_smoa`: one module per foreign format, both directions.
- :mod:`.common`: what they share: PEFT folders, the base model checks; this package's own adapter folders are read
  and written through :mod:`smoa_mlx.adapters.folder`, like everywhere else.
- :mod:`.names`: module paths between mlx-lm and transformers. :mod:`.hf_export`: fused models for PyTorch.
- :mod:`.torch_reference`: the reference layer in PyTorch, to check conversions against.
- ``python -m smoa_mlx.convert`` (:mod:`.__main__`): the command line.
"""

from ..errors import (
    AdapterTypeError,
    BaseModelMismatchError,
    ConversionError,
    GroupingMismatchError,
    MissingKeysError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from .hf_export import export_hf, fuse_adapters
from .peft_hira import hira_to_smoa, smoa_to_hira
from .peft_lora import mlx_lora_to_peft, peft_lora_to_mlx
from .reference_smoa import (
    FragileGroupingWarning,
    reference_orders,
    reference_to_smoa,
    smoa_to_reference,
)

__all__ = [
    "AdapterTypeError",
    "BaseModelMismatchError",
    "ConversionError",
    "FragileGroupingWarning",
    "GroupingMismatchError",
    "MissingKeysError",
    "ShapeMismatchError",
    "UnsupportedArchitectureError",
    "export_hf",
    "fuse_adapters",
    "hira_to_smoa",
    "smoa_to_hira",
    "mlx_lora_to_peft",
    "peft_lora_to_mlx",
    "reference_orders",
    "reference_to_smoa",
    "smoa_to_reference",
]
