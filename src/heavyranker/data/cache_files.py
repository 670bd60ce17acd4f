"""The decoded cache's folders and files on disk (data/cache.py): what marks a folder as ours, and how the
files in it are made and read without ever following a link.

A folder in the cache folder is ours when it is a folder (not a link to one) holding MARKER, a file (not a
link) that names FORMAT_NAME. A build writes the marker first, into a folder it has just made, so a build
that was killed is ours as well; an entry is a marked folder holding MANIFEST, written last. A folder's name
says nothing: `data cache --clear` removed a folder that was not ours because its name looked like a key.
Anything else there (a link, a file, an unmarked folder, the entries of the cache formats before the marker)
is left alone, reported, and never written through."""

from __future__ import annotations

import errno
import json
import mmap
import os
import stat
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from isal import isal_zlib

FORMAT_NAME = "heavyranker-decoded-cache"
VERSION = 3  # bumped when what an entry holds, or how it is computed, changes
MARKER = "heavyranker-cache.json"  # {"format": FORMAT_NAME, "version": VERSION}, written first
MANIFEST = "manifest.json"  # written last

State = Literal["absent", "entry", "building", "foreign"]


def state(folder: Path) -> State:
    """What is at `folder`: nothing; an entry of ours (of any version); a build of ours, running or killed
    (or an entry whose manifest is lost); or something not ours."""
    try:
        fd = open_folder(folder)
    except FileNotFoundError:
        return "absent"
    except OSError:  # a link (ELOOP), a file (ENOTDIR), a folder we may not read
        return "foreign"
    try:
        return _state_in(fd)
    finally:
        os.close(fd)


def _state_in(fd: int) -> State:
    try:
        marker = json.loads(read_small(fd, MARKER))
    except (OSError, ValueError):
        return "foreign"
    if not isinstance(marker, dict) or marker.get("format") != FORMAT_NAME:
        return "foreign"
    try:
        manifest = os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return "building"
    return "entry" if stat.S_ISREG(manifest.st_mode) else "building"


def open_folder(folder: Path) -> int:
    """A descriptor of the folder at `folder`, opened as it is checked: never through a link (ELOOP), never a
    file (ENOTDIR). Files are then opened relative to it, so a link put in the folder's place after it was
    looked at is never followed either."""
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def describe(path: Path) -> str:
    """What a foreign thing at `path` is, for a log line."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "gone"
    if stat.S_ISLNK(mode):
        return f"a link to {os.readlink(path)}"
    return "a folder without the cache's marker" if stat.S_ISDIR(mode) else "not a folder"


def mark(folder: Path) -> None:
    """Marks a folder this process has just made as ours."""
    with create(folder / MARKER) as f:
        f.write(json.dumps({"format": FORMAT_NAME, "version": VERSION}).encode())


def create(path: Path) -> BinaryIO:
    """A new file to write: never one that exists, never through a link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "wb")


def _open_regular(folder: int, name: str) -> int:
    """A descriptor to read the regular file `name` in the folder open as `folder`: OSError for a link
    (ELOOP), a FIFO or a device."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", name)
    return fd


def read_small(folder: int, name: str) -> bytes:
    with os.fdopen(_open_regular(folder, name), "rb") as f:
        return f.read()


def map_file(folder: int, name: str, size: int) -> mmap.mmap | None:
    """The file `name` in the folder open as `folder`, mapped read-only; None when empty (nothing can map 0
    bytes). ValueError when its size is not `size`."""
    fd = _open_regular(folder, name)
    try:
        if os.fstat(fd).st_size != size:
            raise ValueError(f"{name} holds {os.fstat(fd).st_size} bytes, not {size}")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
    finally:
        os.close(fd)


def checksum(data: bytes | mmap.mmap | np.ndarray | None, previous: int = 0) -> int:
    """CRC-32 (gzip's), streaming: pages are read once, in order, without a copy; the GIL is released
    meanwhile. ISA-L's, which folds with carry-less multiplies: at memory speed where crc32c's instruction
    reads at about two thirds of it, and reading every byte of an entry is what verifying it costs."""
    return previous if data is None else isal_zlib.crc32(data, previous)


def describe_os_error(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the reason and its errno name, as far as the error has them."""
    if e.errno is None:
        return str(e)
    return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
