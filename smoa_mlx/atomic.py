"""Atomic file writes: a temporary name in the target folder, fsync, rename, so a crash leaves the old file intact."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

PathLike = Union[str, os.PathLike]

def _publish(tmp: str, path: Path) -> None:
    """fsync, give the file the permissions a plain open() would, and rename it over ``path``."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_safetensors(path: PathLike, arrays: dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    path = Path(path)
    # mx.save_safetensors insists on the .safetensors suffix, so the temporary name keeps it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
