"""SMoA (Spectrum Modulation Adapter) fine-tuning for MLX and mlx-lm."""

from .adapters import apply_smoa, load_adapter, save_adapter, smoa_layers, target_paths
from .config import SMoAConfig
from .layer import SMoALinear
from .spectral import spectral_order

__version__ = "0.1.0"

__all__ = [
    "SMoAConfig",
    "SMoALinear",
    "apply_smoa",
    "load_adapter",
    "save_adapter",
    "smoa_layers",
    "spectral_order",
    "target_paths",
]
