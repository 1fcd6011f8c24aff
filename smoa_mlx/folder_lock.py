"""One writer per output folder: a second run into a folder in use is refused by name.

Without it, two runs into one ``--adapter-path`` both train and the one that saves last silently replaces the
other's work (or, worse, their checkpoints interleave); two conversions or fuses into one output folder likewise.
Training holds ``--adapter-path``, fuse ``--save-path`` (and ``--hf-path``), convert its output folder. The lock
is a file in the folder, ``.smoa_mlx.lock``, holding the writer's pid (for the message), locked with ``flock``:
the kernel drops that lock when its holder dies, SIGKILL and power loss included, so a stale lock file is simply
taken over. Where ``flock`` is not available (some network file systems) the pid decides instead: a lock whose
process no longer runs is taken over.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional, Union

from .adapters.folder import file_not_folder
from .atomic import is_disk_full, recover_folder
from .errors import DiskFullError, FolderInUseError, SavePathExistsError

LOCK_NAME = ".smoa_mlx.lock"

try:
    import fcntl
except ImportError:  # Windows: pids only
    fcntl = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def folder_contents(folder: Path) -> list[str]:
    """The sorted names in ``folder`` (none if it is not one) other than its lock file: what a writer holding the
    folder would replace, so that a folder the lock itself created counts as empty."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def _read_pid(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class FolderLock:
    """``with FolderLock(folder, "--adapter-path"):`` holds the folder for this process (creating the folder).

    On release the lock file is removed, and so is the folder if this lock created it and nothing else was put
    in it (a run refused after taking the lock leaves no trace).
    """

    def __init__(self, folder: Union[str, os.PathLike], flag: str = "--adapter-path"):
        self.folder = Path(folder)
        self.flag = flag
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None
        self.created = False
        self.took_over: Optional[int] = None  # the pid of a dead holder whose lock was taken over

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> bool:
        self.release()
        return False

    def _refuse(self, pid: Optional[int]) -> None:
        holder = f"pid {pid}" if pid else "another process"
        raise FolderInUseError(
            f"{self.flag} {self.folder} is in use by another run ({holder}; lock file {self.path}): "
            f"wait for it to finish, stop it, or choose another {self.flag}"
        )

    def acquire(self) -> None:
        recover_folder(self.folder)  # before creating it: a new empty folder would hide the one to put back
        if self.folder.exists() and not self.folder.is_dir():
            raise SavePathExistsError(f"{self.flag} {file_not_folder(self.folder)}")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    self._refuse(_read_pid(fd))
                # The previous holder may have removed the file between our open and our lock: then retry.
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except BaseException:
                os.close(fd)
                self._forget_folder()
                raise
            os.close(fd)
        old = _read_pid(fd)
        if old and old != os.getpid():
            self.took_over = old
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self.release()
            if is_disk_full(e):
                raise DiskFullError(f"disk full while writing the lock file {self.path}; nothing was written") from None
            raise

    @property
    def note(self) -> Optional[str]:
        """The line to show when a dead writer's lock was taken over (None when there was none)."""
        if self.took_over is None:
            return None
        return f"{self.folder}: took over the lock of pid {self.took_over}, which no longer runs"

    def _lock(self, fd: int) -> bool:
        """True when this process now holds the lock; False when a live process does."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        pid = _read_pid(fd)
        return pid is None or pid == os.getpid() or not _alive(pid)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self._still_ours():  # while still locked: no one can be holding the unlinked file
                self.path.unlink()
        finally:
            os.close(self.fd)
            self.fd = None
        self._forget_folder()

    def _still_ours(self) -> bool:
        """Whether the lock file at the path is the one this lock holds: a folder replaced whole (fuse --force)
        took that file away with the old folder, and a lock file there now is another writer's."""
        try:
            here, mine = os.stat(self.path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _forget_folder(self) -> None:
        if self.created:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass
