"""The local folder a server downloads object-store versions into, and the sweep of those of servers gone.

A server's folder is removed when its process ends, but not when it is killed (SIGKILL, the OOM killer, a
container stopped hard): each such kill left a model's size of files in the temporary folder for good. So
each folder has a lock file beside it (`<folder>.lock`), locked (flock) for its process's life; a new one
removes the folders of the same prefix whose lock nobody holds. The kernel releases a lock with its
process, however it ends, so a folder in use is never taken. The lock file is locked under a temporary name
and renamed into place: a sweep never sees it unlocked between its creation and its lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".lock"  # the lock file of folder F is F.lock


class DownloadFolder:
    """A fresh folder `prefix*` in the temporary folder, held by this process until it is closed or this
    object is collected (and released by the kernel if the process is killed)."""

    def __init__(self, prefix: str):
        sweep(prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        lock = self.path.with_name(self.path.name + LOCK)
        locking = lock.with_name(f"{lock.name}.{os.getpid()}")
        descriptor = os.open(locking, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.rename(locking, lock)
        self._finalizer = weakref.finalize(self, _release, self.path, descriptor)

    def close(self) -> None:
        self._finalizer()


def _release(folder: Path, descriptor: int) -> None:
    _remove(folder)
    os.close(descriptor)


def _remove(folder: Path) -> None:
    """The folder, then its lock file: a sweep killed in between leaves a lock file only, swept again."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.with_name(folder.name + LOCK).unlink(missing_ok=True)


def sweep(prefix: str) -> None:
    """Removes the folders `prefix*` in the temporary folder whose lock file no process holds. A folder
    without a lock file (being created, or left by a version before the locks) is left alone."""
    for lock in Path(tempfile.gettempdir()).glob(f"{prefix}*{LOCK}"):
        try:
            descriptor = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # gone, or not ours to read
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its server runs
            continue
        finally:
            os.close(descriptor)
        folder = lock.with_name(lock.name.removesuffix(LOCK))
        _remove(folder)
        log.info("removed %s, the downloads of a server that was killed", folder)
