"""Files that appear under their name only once complete, so a reader (a resumed run, a server loading a
model folder, `evaluate --watch`) sees the old file or the new one, never half of one.

The content goes to a temporary in the same folder (a rename is atomic only within one file system), named
`.NAME.tmp-PID-THREAD`: hidden, so globs (`*.gz`, `*`) and the checkpoint listing never see it, and distinct
per writer (two threads of a process writing one file each write their own). It is fsynced before the
rename, and the folder after it, so that after a power cut the name holds either the previous file or the
complete new one. On any exception (KeyboardInterrupt included) the temporary is removed and the previous
file is left as it was.

A symbolic link at the temporary's name is refused (one line), never written through: the file it points at
stays as it was."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import UserError

# The names _replacing gives (fullmatch: $ takes a final \n); the thread is absent from those of before it.
_TEMPORARY = re.compile(r"\.(.+)\.tmp-([0-9]+)(?:-[0-9]+)?")


class Temporary(NamedTuple):
    path: Path
    target: str  # the name of the file it was to replace
    pid: int  # of the writer


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """An open file (`mode`: "wb" or "w") whose content replaces `path` when the block ends without error.
    Prefer it to atomic_path where the writer takes a file object (np.savez then adds no ".npz")."""
    with _replacing(Path(path)) as temporary, open(temporary, mode, opener=without_following) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path for writers that open the file themselves (pyarrow's, shutil.copyfile); the file
    written there replaces `path` when the block ends without error."""
    with _replacing(Path(path)) as temporary:
        yield temporary
        _fsync(temporary, os.O_RDONLY)  # Linux flushes the file's data whatever the mode of the descriptor


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    # A writer that opens the temporary itself (atomic_path) cannot be told not to follow a link: check first.
    writer = f"{os.getpid()}-{threading.get_native_id()}"
    temporary = refuse_link(path.with_name(f".{path.name}.tmp-{writer}"))
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise
    _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)  # makes the rename itself durable


def output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path`, checked before the work whose result it will hold, its folder made: a folder at `path`, or a
    folder of it that cannot be made (a file in the way, no permission), is one line naming `flag` (such as
    "data stats: --out") at once, where the write would have failed after the work, naming a temporary."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the name of a file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create its folder: {e.strerror}") from None
    return path


def without_following(path: str | os.PathLike, flags: int, mode: int = 0o666) -> int:
    """os.open that refuses a symbolic link at `path` (also as `open(..., opener=without_following)`): a link
    planted there must not make us truncate or append to the file it points at."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise _a_link(path) from None
        raise


def refuse_link(path: Path) -> Path:
    """`path`, unless a symbolic link is there: for the files we replace or read back as our own."""
    if path.is_symlink():
        raise _a_link(path)
    return path


def _a_link(path: str | os.PathLike) -> UserError:
    return UserError(f"{path}: a symbolic link, which heavyranker does not write through; remove it")


def temporaries(folder: str | os.PathLike) -> list[Temporary]:
    """The temporaries in `folder` (none if it does not exist): files being written, or left by a writer
    that was killed (an exception removes its own)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [_TEMPORARY.fullmatch(name) for name in os.listdir(folder)]
    return [Temporary(folder / m.group(0), m.group(1), int(m.group(2))) for m in found if m]


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
