"""SMoA (Spectrum Modulation Adapter) fine-tuning for MLX and mlx-lm.

Where things are (README.md has the whole tree):
the core is :mod:`.config` (hyperparameters), :mod:`.spectral` (row/column ordering), :mod:`.layer`
(:class:`SMoALinear`) and :mod:`.kernels` (the block-modulated product); :mod:`.adapters` wraps a model and owns
the adapter folder on disk; :mod:`.train` fine-tunes on mlx-lm's loop; :mod:`.fuse`, :mod:`.chat` and
:mod:`.generate` are the commands; :mod:`.models` and :mod:`.loading` load base models; :mod:`.convert` talks
to PyTorch; :mod:`.eval` scores BIG-bench tasks; :mod:`.errors` and :mod:`.atomic` serve everything.
"""

from .adapters import apply_smoa, load_adapter, save_adapter, smoa_layers, target_paths
from .config import SMoAConfig
from .errors import BaseModelMismatchError, SMoAError
from .layer import SMoALinear
from .spectral import spectral_order

__version__ = "0.1.0"

__all__ = [
    "BaseModelMismatchError",
    "SMoAConfig",
    "SMoAError",
    "SMoALinear",
    "apply_smoa",
    "load_adapter",
    "save_adapter",
    "smoa_layers",
    "spectral_order",
    "target_paths",
]
