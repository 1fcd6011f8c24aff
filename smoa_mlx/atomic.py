"""Atomic writes: the package's one way to put files and folders on disk.

Everything is first written under a temporary name in the target folder, flushed to disk, and only then renamed
over the target, so a crash, a kill or a full disk leaves the previous file (or folder) intact and never a half
of one. Several files that belong together (an adapter's weights and its config) are all staged before the
first is renamed, so a full disk cannot leave new weights beside an old config.

Temporary names start with ``.smoa-tmp-<pid>-``: recognisably this project's, and carrying the writer's process
id, so a later write into the same folder removes those whose writer is dead (a killed save leaves one behind)
without touching one another process is still writing. A folder replaced whole is swapped with its new version in
one step where the system can (:func:`replace_folder`); elsewhere the old one waits under ``.smoa-old-<pid>-``
until the new one is in place, and a writer killed in between has it put back by the next write or model load
(:func:`recover_folder`). Running out of space (``ENOSPC``, a quota, or MLX's
``[write] Unable to write``) raises :class:`~smoa_mlx.errors.DiskFullError` naming the file, with nothing left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import mlx.core as mx

from .errors import DiskFullError

PathLike = Union[str, os.PathLike]
Writer = Callable[[Path], None]

TMP_PREFIX = ".smoa-tmp-"
OLD_PREFIX = ".smoa-old-"  # the previous version of a folder being replaced, kept until the new one is in place


# -- temporary names --------------------------------------------------------------------------------------
def temp_path(target: Path, prefix: str = TMP_PREFIX) -> Path:
    """A fresh temporary sibling of ``target`` that keeps its name as the suffix (MLX wants ``.safetensors``)."""
    return target.parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}-{target.name}"


def _parse(name: str) -> Optional[tuple[str, int, str]]:
    """(prefix, writer pid, target name) of one of this project's temporary names; None for any other name."""
    for prefix in (TMP_PREFIX, OLD_PREFIX):
        if name.startswith(prefix):
            parts = name[len(prefix) :].split("-", 2)
            if len(parts) == 3 and parts[0].isdigit():
                return prefix, int(parts[0]), parts[2]
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(folder: Path) -> Iterator[tuple[Path, str, str]]:
    """(entry, prefix, target name) of this project's temporary names in ``folder`` whose writer is gone."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        parsed = _parse(entry.name)
        if parsed is not None and parsed[1] != os.getpid() and not _alive(parsed[1]):
            yield entry, parsed[0], parsed[2]


def _put_back(old: Path, target: Path) -> None:
    os.replace(old, target)
    message = (f"{target} was missing: a replacement of it was killed between its two renames; put back the previous "
               f"folder from {old.name}")
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def recover_folder(path: PathLike) -> bool:
    """Put the last complete folder back at ``path`` if a writer was killed between the two renames of
    :func:`replace_folder` (``path`` missing, the old folder under ``.smoa-old-``); warns naming it. True if it did.

    Readers of folders this package replaces whole (the model loaders) call it, so that no reader ever finds
    the folder gone.
    """
    path = Path(path)
    if os.path.lexists(path):
        return False
    for entry, prefix, name in _stale(path.parent):
        if prefix == OLD_PREFIX and name == path.name:
            _put_back(entry, path)
            return True
    return False


def remove_stale(folder: PathLike) -> list[Path]:
    """Remove this project's temporary files and folders in ``folder`` whose writing process is gone, after
    putting back any old folder whose replacement was killed before the new one was in place."""
    removed = []
    for entry, prefix, name in _stale(Path(folder)):
        if prefix == OLD_PREFIX and not os.path.lexists(entry.parent / name):
            _put_back(entry, entry.parent / name)
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


def write_files(
    folder: PathLike, writers: Mapping[str, Writer], what: str = "file", retire: Iterable[str] = ()
) -> Path:
    """Write several files of ``folder`` (created if needed) all or nothing; ``writers[name](tmp)`` writes one.

    Every file is written and flushed under a temporary name first; then they are renamed into place in the
    order given (put the file that marks a folder complete, such as a config, last). The files named in
    ``retire`` are removed after the staging succeeded and before the first rename: the marker of an old version
    that must not be seen beside the first new files (a config that does not describe the new weights), so that a
    kill between the renames leaves an incomplete folder rather than a mismatched one. ``what`` names the
    previous content in the disk-full message ("the previous adapter is intact").
    """
    folder = Path(folder)
    created = not folder.exists()
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
        for name in retire:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if created:  # a failed write into a new folder leaves no empty folder behind either
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: after success it is not
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
def staged_folder(path: PathLike, what: str = "folder") -> Iterator[Path]:
    """Yield an empty temporary sibling of ``path`` to fill; when the block succeeds it becomes ``path``.

    An existing ``path`` is replaced whole (:func:`replace_folder`: a crash leaves the old or the new one, never a
    mix of their files). Refusing an existing ``path`` is the caller's business.
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
        if path.exists():
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, path: Path) -> None:
    """Put the complete folder ``new`` in the place of the folder ``path``, so that a crash at any instant leaves
    one of the two, whole, at ``path``; afterwards ``new`` names nothing or the old folder (the caller removes it).

    Linux and macOS swap two folders in one step (:func:`exchange`). Where they cannot (another system or file
    system), POSIX has no such step: the old folder is renamed aside to ``.smoa-old-<pid>-...``, the new one into
    place, then the old one deleted. A kill between those two renames leaves no folder at ``path``; the next
    write into its parent, or the next load of it, puts the old one back (:func:`recover_folder`).
    """
    if exchange(new, path):
        return
    old = temp_path(path, OLD_PREFIX)
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange_call() -> Optional[Callable[[bytes, bytes], int]]:
    """The C library's atomic swap of two paths as ``f(a, b) -> 0 or -1``, or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        return lambda a, b: libc.renameat2(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        return lambda a, b: libc.renamex_np(a, b, rename_swap)
    return None


_EXCHANGE = _exchange_call()
# What a file system says when it cannot exchange: then the two-rename fallback is the only way.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM}


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
    ``renamex_np(RENAME_SWAP)``); False, with nothing changed, where the system or file system cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
