"""Adapters to and from PyTorch: reference SMoA, stock PEFT (HiRA, LoRA, DoRA), and fused Hugging Face models.

The MLX side never needs torch: PEFT folders are plain safetensors + JSON. torch/peft are only needed to *use* the
converted files (and by :mod:`smoa_mlx.convert.torch_reference`, imported lazily).
"""

from ..errors import (
    AdapterTypeError,
    BaseModelMismatchError,
    ConversionError,
    MissingKeysError,
    ShapeMismatchError,
    UnsupportedArchitectureError,
)
from .hf_export import export_hf, fuse_adapters
from .peft_hira import hira_to_smoa, smoa_to_hira
from .peft_lora import mlx_lora_to_peft, peft_lora_to_mlx
from .reference_smoa import (
    FragileGroupingWarning,
    GroupingMismatchError,
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
