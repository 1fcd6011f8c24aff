"""Atomic writes: the package's one way to put files and folders on disk.

Everything is first written under a temporary name in the target folder, flushed to disk, and only then renamed
over the target, so a crash, a kill or a full disk leaves the previous file (or folder) intact and never a half
of one. Several files that belong together (an adapter's weights and its config) are all staged before the
first is renamed, so a full disk cannot leave new weights beside an old config.

Temporary names start with ``.smoa-tmp-<pid>-``: recognisably this project's, and carrying the writer's process
id, so a later write into the same folder removes those whose writer is dead (a killed save leaves one behind)
without touching one another process is still writing. Running out of space (``ENOSPC``, a quota, or MLX's
``[write] Unable to write``) raises :class:`~smoa_mlx.errors.DiskFullError` naming the file, with nothing left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Union

import mlx.core as mx

from .errors import DiskFullError

PathLike = Union[str, os.PathLike]
Writer = Callable[[Path], None]

TMP_PREFIX = ".smoa-tmp-"


# -- temporary names --------------------------------------------------------------------------------------
def temp_path(target: Path) -> Path:
    """A fresh temporary sibling of ``target`` that keeps its name as the suffix (MLX wants ``.safetensors``)."""
    return target.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


def _writer_pid(name: str) -> Optional[int]:
    if not name.startswith(TMP_PREFIX):
        return None
    pid = name[len(TMP_PREFIX) :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(folder: PathLike) -> list[Path]:
    """Remove this project's temporary files and folders in ``folder`` whose writing process is gone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = _writer_pid(entry.name)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
    return removed


# -- errors -----------------------------------------------------------------------------------------------
def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # MLX's writers report a short write as a bare RuntimeError: "[write] Unable to write N bytes to file."
    return isinstance(error, RuntimeError) and "Unable to write" in str(error)


@contextlib.contextmanager
def _named_disk_full(target: Path, what: str) -> Iterator[None]:
    """Turn running out of space inside the block into one DiskFullError naming ``target``."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e):
            raise DiskFullError(f"disk full while writing {target}; the previous {what} is intact ({e})") from None
        raise


# -- files ------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_permissions(path: Path, mode: int) -> None:
    """What a plain open() / mkdir() would have given (temporary files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def write_files(folder: PathLike, writers: Mapping[str, Writer], what: str = "file") -> Path:
    """Write several files of ``folder`` (created if needed) all or nothing; ``writers[name](tmp)`` writes one.

    Every file is written and flushed under a temporary name first; then they are renamed into place in the
    order given (put the file that marks a folder complete, such as a config, last). ``what`` names the
    previous content in the disk-full message ("the previous adapter is intact").
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            target = folder / name
            tmp = temp_path(target)
            staged.append((tmp, target))
            with _named_disk_full(target, what):
                write(tmp)
                _fsync(tmp)
            _plain_permissions(tmp, 0o666)
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return folder


def bytes_writer(data: bytes) -> Writer:
    return lambda tmp: tmp.write_bytes(data)


def text_writer(text: str) -> Writer:
    return bytes_writer(text.encode())


def safetensors_writer(arrays: Mapping[str, mx.array], metadata: Optional[dict] = None) -> Writer:
    return lambda tmp: mx.save_safetensors(str(tmp), dict(arrays), metadata=dict(metadata or {}))


def atomic_write_bytes(path: PathLike, data: bytes, what: str = "file") -> None:
    path = Path(path)
    write_files(path.parent, {path.name: bytes_writer(data)}, what)


def atomic_write_text(path: PathLike, text: str, what: str = "file") -> None:
    atomic_write_bytes(path, text.encode(), what)


def atomic_save_safetensors(
    path: PathLike, arrays: Mapping[str, mx.array], metadata: Optional[dict] = None, what: str = "file"
) -> None:
    path = Path(path)
    write_files(path.parent, {path.name: safetensors_writer(arrays, metadata)}, what)


# -- folders ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_folder(path: PathLike, merge: bool = False, what: str = "folder") -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill; when the block succeeds it becomes ``path``.

    An existing ``path`` is replaced whole (the old one is deleted only once the new one is in place), or with
    ``merge`` updated file by file (each rename atomic; ``config.json`` last, so a reader that sees the new
    config also sees the new weights; ``model*.safetensors*`` shards the new folder lacks are removed).
    Refusing an existing ``path`` is the caller's business.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    tmp = temp_path(path)
    tmp.mkdir()
    _plain_permissions(tmp, 0o777)
    try:
        with _named_disk_full(path, what):
            yield tmp
            for item in tmp.iterdir():
                if item.is_file():
                    _fsync(item)
        if merge and path.is_dir():
            _merge_into(tmp, path)
        elif path.exists():
            old = temp_path(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_into(staging: Path, out: Path) -> None:
    written = {p.name for p in staging.iterdir()}
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        os.replace(item, out / item.name)
    for stale in out.glob("model*.safetensors*"):  # shards of an earlier, differently sharded model
        if stale.name not in written:
            stale.unlink()
