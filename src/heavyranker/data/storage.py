"""Where data files live: local paths, or URLs (s3://, gs://, az://, ...) read through fsspec.

A URL's back-end (s3fs, gcsfs, ...) is found by fsspec and takes its credentials and settings from its own
standard chain (environment, config files, instance metadata; for s3 also AWS_ENDPOINT_URL), never from
the URL: a URL holding a user name, a password or a signed query (X-Amz-Signature=, sig=, token=, ...) is
refused, so that no secret reaches a log, an error or a run folder. A back-end's own errors (botocore's,
aiohttp's: not OSErrors) become one line naming the URL.
Remote files stream with read-ahead, and a read that fails for a transient reason (connection reset, time
out, throttling, a 5xx) is retried with backoff from the byte offset it had reached."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import fsspec
from fsspec.spec import AbstractFileSystem

from ..errors import UserError
from ..urls import credentials_in, redact

log = logging.getLogger(__name__)

BLOCK_SIZE = 8 << 20  # bytes per request: its cost is paid once per 8 MiB (4 MiB cost moto 1.7x the time)
TRIES = 5  # reads of the same bytes before the error is reported
BACKOFF = 0.1  # seconds before the second try, doubled for each further one ...
MAX_BACKOFF = 2.0  # ... up to this
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pyproject's extras, by URL scheme


FETCH_THREADS = 64  # at most; started as fetches need them
_pool: list[ThreadPoolExecutor] = []  # the one pool, once made
_pool_lock = threading.Lock()  # reader threads open remote files at once: one of them makes it


def _fetches() -> ThreadPoolExecutor:
    """The fetch threads, made at the first remote read: importing this module (every data command does)
    makes none. They mostly wait for the back-end's event loop; one per open remote file keeps every file's
    next block coming (a training reads file_batch_size files at once)."""
    with _pool_lock:
        if not _pool:
            _pool.append(ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="heavyranker-fetch"))
        return _pool[0]


class FileChanged(OSError):
    """The file was replaced between two reads of it: reading on would join two versions."""


# Errors that reading again cannot cure. Every other error of a read is taken for transient: back-ends raise
# their HTTP libraries' own errors (s3fs lets aiohttp's ClientPayloadError through once its own retries are
# spent), which share no base class with OSError, and an error that does persist is reported after TRIES.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileChanged)
_VERSION_KEYS = ("ETag", "etag", "generation")  # how s3fs, adlfs and gcsfs name an object's version


def is_url(path: str) -> bool:
    """Whether `path` is read through fsspec: it has a scheme other than file://."""
    return "://" in path and not path.startswith("file://")


def local(path: str) -> str:
    """A local path or a file:// URL as a plain path."""
    return path.removeprefix("file://")


def filesystem(url: str) -> AbstractFileSystem:
    """The fsspec file system of `url`. Raises UserError when its back-end is not installed or the URL
    holds credentials (the message leaves them out)."""
    scheme = url.split("://", 1)[0].lower()
    problem = credentials_in(url)
    if problem:
        raise UserError(
            f"{redact(url)}: a URL must not hold {problem} (it would be logged); give credentials the way "
            f"the {scheme}:// back-end reads them (environment, config files)"
        )
    try:
        return fsspec.filesystem(scheme)
    except ImportError as e:
        extra = _EXTRAS.get(scheme)
        remedy = f"pip install 'heavyranker[{extra}]'" if extra else str(e).splitlines()[0]
        raise UserError(f"{url}: reading {scheme}:// URLs needs a back-end: {remedy}") from None
    except ValueError:
        raise UserError(f"{url}: no fsspec back-end knows the scheme {scheme}://") from None


def error_line(error: BaseException) -> str:
    """An error of a back-end in one line: its type and the first line of its message, URLs redacted."""
    lines = str(error).strip().splitlines()
    return redact(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)


def file_version(path: str) -> dict[str, object]:
    """What identifies this version of the file: its size and modification time (local) or its size and
    the back-end's version tag (ETag, generation) or modification time (remote). A changed file changes it."""
    if not is_url(path):
        stat = os.stat(local(path))
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    fs = filesystem(path)
    try:
        info = fs.info(path)
    except OSError:
        raise
    except Exception as e:  # the back-end's own: an OSError, as a failed read is
        raise OSError(error_line(e)) from None
    return version_of(info)


def version_of(info: dict) -> dict[str, object]:
    """file_version() of a remote file from its back-end's details (fs.info, or a listing's entry)."""
    keys = (*_VERSION_KEYS, "LastModified", "mtime", "updated")
    return {"size": info.get("size"), **{key: str(info[key]) for key in keys if key in info}}


def open_binary(path: str) -> BinaryIO:
    """`path` opened for reading: a local file, or a remote one streamed with read-ahead and retries."""
    if not is_url(path):
        return open(local(path), "rb")
    # The buffer serves small reads (a plain file's record headers); fsspec's own cache does the read-ahead.
    return io.BufferedReader(RetryingReader(filesystem(path), path))


class RetryingReader(io.RawIOBase):
    """A remote file fetched BLOCK_SIZE bytes at a time, the next block on a fetch thread while the reader
    consumes the current one: a file arrives at the reader's speed rather than at request latency plus
    transfer time. A fetch that fails for a transient reason re-opens the file at the block's offset, so that
    no byte is lost or read twice; after TRIES failed fetches of the same bytes the last error is raised.
    Reads from the start on; seeks to an absolute offset, or from the end (pyarrow finds a Parquet file's
    footer so). Holds two blocks at most."""

    def __init__(self, fs: AbstractFileSystem, url: str):
        self._fs = fs
        self._url = url
        self._offset = 0  # of the next byte readinto gives
        self._block = memoryview(b"")  # the bytes from _block_start on
        self._block_start = 0
        self._next: Future[bytes] | None = None  # the block after _block, being fetched
        self._file: BinaryIO | None = None  # opened at the first fetch, re-opened after a failed one
        self._version: tuple | None = None  # the size and version of the file first opened

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            offset, whence = self._fs.size(self._url) + offset, io.SEEK_SET
        if whence != io.SEEK_SET:
            raise io.UnsupportedOperation("seek to an absolute offset, or from the end, only")
        if not self._block_start <= offset < self._block_start + len(self._block):
            self._drop_blocks()
        self._offset = offset
        return offset

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        at = self._offset - self._block_start
        if at >= len(self._block):
            end = self._block_start + len(self._block)
            if self._next is None or end != self._offset:  # the first read, or after a seek
                self._drop_blocks()
                self._next = _fetches().submit(self._fetch, self._offset)
            block, self._next = self._next.result(), None
            self._block, self._block_start, at = memoryview(block), self._offset, 0
            if block:  # not at the end: the next block is fetched while this one is read
                self._next = _fetches().submit(self._fetch, self._offset + len(block))
        n = min(len(buffer), len(self._block) - at)
        buffer[:n] = self._block[at : at + n]
        self._offset += n
        return n

    def _fetch(self, offset: int) -> bytes:
        for attempt in range(1, TRIES + 1):
            try:
                if self._file is None:
                    self._file = self._open(offset)
                self._file.seek(offset)  # no request: where the next read starts
                return self._file.read(BLOCK_SIZE)
            except _PERMANENT:
                raise
            except Exception as e:
                self._drop_file()
                if attempt == TRIES:
                    # An OSError: read_records reports it as unreadable data, naming the URL and record.
                    raise OSError(f"{error_line(e)} ({TRIES} tries)") from None
                log.warning(
                    "%s: %s at byte %d, reading again (try %d)", self._url, error_line(e), offset, attempt + 1
                )
                time.sleep(min(MAX_BACKOFF, BACKOFF * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _open(self, offset: int) -> BinaryIO:
        # No fsspec cache: each read is one ranged request, straight into the block (one copy fewer).
        file = self._fs.open(self._url, "rb", cache_type="none")
        # Not every back-end's file says (pyarrow's HDFS files do not); there the records' checksums are left
        # to catch a replaced file.
        details = getattr(file, "details", None) or {}
        version = (details.get("size"), *(details.get(key) for key in _VERSION_KEYS))
        if self._version is None:
            self._version = version
        elif version != self._version:
            file.close()
            raise FileChanged(f"the file was replaced while being read, at byte {offset}")
        file.seek(offset)
        return file

    def close(self) -> None:
        self._drop_blocks()
        self._drop_file()
        super().close()

    def _drop_blocks(self) -> None:
        """Forgets the blocks; waits for a fetch in flight (it uses the file)."""
        if self._next is not None:
            next_, self._next = self._next, None
            if not next_.cancel():
                with contextlib.suppress(Exception):  # its error belongs to bytes no longer wanted
                    next_.result()
        self._block, self._block_start = memoryview(b""), self._offset

    def _drop_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except Exception:  # a broken connection may fail to close too; the file is dropped either way
                pass
