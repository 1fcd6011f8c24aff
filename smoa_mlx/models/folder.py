"""Write an mlx-lm model folder (config.json, model.safetensors, tokenizer files) without leaving half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Union

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import save_config, save_model

PathLike = Union[str, Path]


def save_model_folder(
    path: PathLike, model: nn.Module, tokenizer: TokenizerWrapper, config: dict[str, Any], force: bool = False
) -> Path:
    """Save a model folder that stock ``mlx_lm.load``/``generate``/``chat`` read.

    mlx-lm's own writers (``save_model``, ``save_config``, ``save_pretrained``) do the work; they write file by
    file, so the folder is assembled in a temporary sibling and renamed into place: an interrupted save never
    leaves a folder that looks like a model. An existing ``path`` is refused unless ``force``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the model folder's permissions
    try:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
        if path.exists():  # the old model is deleted only once the new one is in place
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
