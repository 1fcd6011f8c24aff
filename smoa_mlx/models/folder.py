"""Write an mlx-lm model folder (config.json, model.safetensors, tokenizer files) without leaving half of one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import save_config, save_model

from ..atomic import staged_folder

PathLike = Union[str, Path]


def save_model_folder(
    path: PathLike, model: nn.Module, tokenizer: TokenizerWrapper, config: dict[str, Any], force: bool = False
) -> Path:
    """Save a model folder that stock ``mlx_lm.load``/``generate``/``chat`` read.

    mlx-lm's own writers (``save_model``, ``save_config``, ``save_pretrained``) do the work; they write file by
    file, so the folder is assembled in a temporary sibling and renamed into place (:func:`~smoa_mlx.atomic.
    staged_folder`): an interrupted save never leaves a folder that looks like a model. An existing ``path`` is
    refused unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    with staged_folder(path, what="model folder") as tmp:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
    return path
