"""A model repository in Triton's layout, shared by `export --repository`, `promote`, `serve --repository`:

    REPO/<model-name>/config.pbtxt         Triton's config of the newest ONNX version (export writes it)
    REPO/<model-name>/<version>/           1, 2, 3, ...: one `export` folder each (model.onnx or model.pt2,
                                           manifest.json, schema.json, config.pbtxt), and
    REPO/<model-name>/<version>/READY      the completion marker, written last
    REPO/<model-name>/promotions.jsonl     every decision of `promote`, one JSON object a line
    REPO/<model-name>/.serving-<host>-<pid>  the version a running server serves (retention keeps it)
    REPO/<model-name>/.numbering.lock      an flock that publishers take their numbers under

A version is complete when its folder's name is a number and READY is in it; readers see nothing else. It is
written in a hidden staging folder in REPO/<model-name>/ (so on the same file system), READY last, then
renamed to its number: on a local disk the rename makes it appear whole; READY is what marks it complete
where a rename is not atomic (an object store's folder is written file by file, READY last). Triton ignores
folders whose name is not a number, so it never sees the staging folder either.

READY holds when the version was published and each of its files' size and SHA-256 (ready_record).

Retention keeps the newest K complete versions, plus those a server's marker names (what it serves, pinned
or not); an older one is renamed to a hidden name (out of every listing at once), then removed.

A repository in object storage (an fsspec URL: s3://bucket/prefix) has the same layout and the same
methods (object_repository.py); `open_repository` gives the one a location needs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_write, without_following
from ..errors import UserError

if TYPE_CHECKING:  # export (torch, onnx) is imported where a version is exported, not by every CLI command
    from ..config import Config

log = logging.getLogger(__name__)

READY = "READY"
DECISIONS = "promotions.jsonl"
TRITON_CONFIG = "config.pbtxt"
SERVING_MARKER = ".serving-"
STAGING = ".staging-"
NUMBERING_LOCK = ".numbering.lock"  # publishers take their numbers one at a time (_rename_to_next)
DELETING = ".deleting-"
# A server touches its marker at each poll (every few seconds); one older than this is from a server that
# died without removing it, and no longer protects its version.
MARKER_TTL_S = 3600.0
# A staging folder this old is a publisher's that was killed (an export takes minutes): retention removes it.
STAGING_TTL_S = 86400.0
DEFAULT_KEEP = 5


class ModelRepository:
    """The versions of one model (`model_name`) in the repository at `root`."""

    def __init__(self, root: str | os.PathLike, model_name: str):
        check_model_name(model_name)
        self.root = Path(root)
        self.model_name = model_name
        self.folder = self.root / model_name

    def version_folder(self, version: int) -> Path:
        return self.folder / str(version)

    def location(self, version: int) -> str:
        """Where the version is, for people (the folder; a URL in object storage)."""
        return str(self.version_folder(version))

    def local_folder(self, version: int) -> Path:
        """A local folder holding the version's files, to load it from: here, the version's own folder."""
        return self.version_folder(version)

    def ready_stamp(self, version: int) -> object:
        """What changes when the version's READY is written again (its mtime); None when it is not there."""
        try:
            return (self.version_folder(version) / READY).stat().st_mtime_ns
        except OSError:
            return None

    def published(self, version: int) -> float | None:
        """When the version was published (time.time()), from its READY; None when that is not there."""
        try:
            return (self.version_folder(version) / READY).stat().st_mtime
        except OSError:
            return None

    def versions(self) -> list[int]:
        """The complete versions, oldest first; none if the repository or the model's folder is not there."""
        return sorted(v for v in self._numbered() if (self.version_folder(v) / READY).is_file())

    def newest(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def publish(self, write: Callable[[Path], object], *, keep: int | None = DEFAULT_KEEP) -> int:
        """Adds the next version: `write(folder)` fills a staging folder (export_model(out=folder)), then
        READY is written and the folder renamed to its number. Returns it; prunes to `keep`."""
        staging = self.folder / f"{STAGING}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with self._writing():
            self.folder.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
        try:
            write(staging)
            record = ready_record(staging)
            with atomic_write(staging / READY, "w") as f:
                f.write(json.dumps(record) + "\n")
            version = self._rename_to_next(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if (staging_config := self.version_folder(version) / TRITON_CONFIG).is_file():
            with atomic_write(self.folder / TRITON_CONFIG, "w") as f:
                f.write(staging_config.read_text())
        log.info("published %s version %d in %s", self.model_name, version, self.root)
        if keep is not None:
            self.prune(keep)
        return version

    def prune(self, keep: int, protect: Collection[int] = ()) -> list[int]:
        """Removes the complete versions older than the newest `keep`, except `protect` and those a live
        server's marker names. Returns the removed ones."""
        if keep < 1:
            raise UserError(f"keep {keep}: the repository keeps at least the newest version")
        # One listing: a second one could hold a version published meanwhile, newer than every kept one.
        versions = self.versions()
        kept = set(versions[-keep:]) | set(protect) | set(self.served_versions())
        removed = []
        for version in (v for v in versions if v not in kept):
            doomed = self.folder / f"{DELETING}{version}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.version_folder(version), doomed)  # out of every listing at once
            except FileNotFoundError:  # another publisher's retention took it first
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(version)
            log.info("removed %s version %d (retention: the newest %d)", self.model_name, version, keep)
        self._remove_leftovers()
        return removed

    def _remove_leftovers(self) -> None:
        """What a publisher or a retention killed half way left: folders being deleted, and staging folders
        older than STAGING_TTL_S. Neither is a version nor becomes one."""
        now = time.time()
        for path in self.folder.glob(".*-*"):
            try:
                stale = path.name.startswith(DELETING) or (
                    path.name.startswith(STAGING) and now - path.stat().st_mtime > STAGING_TTL_S
                )
            except OSError:  # removed meanwhile
                continue
            if stale:
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left by a publisher or a retention that was stopped", path)

    def mark_served(self, version: int) -> Path:
        """Records (or refreshes) that this process serves `version`; returns the marker's path."""
        marker = self.marker_path()
        with atomic_write(marker, "w") as f:
            f.write(f"{version}\n")
        return marker

    def marker_path(self) -> Path:
        """This process's marker of the version it serves."""
        return self.folder / marker_name()

    def unmark_served(self) -> None:
        """This process serves no version any more (it stops)."""
        self.marker_path().unlink(missing_ok=True)

    def served_versions(self) -> list[int]:
        """The versions that servers' markers, touched within MARKER_TTL_S, name."""
        found = []
        now = time.time()
        for marker in self.folder.glob(f"{SERVING_MARKER}*") if self.folder.is_dir() else ():
            try:
                if now - marker.stat().st_mtime < MARKER_TTL_S:
                    found.append(int(marker.read_text()))
            except (OSError, ValueError):  # removed meanwhile, or being written
                continue
        return found

    def append_decision(self, record: dict[str, Any]) -> None:
        """One line appended to promotions.jsonl with a single write: concurrent writers' lines never mix."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._writing():
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = without_following(self.folder / DECISIONS, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a line torn by a crash: this one starts anew
                line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def decisions(self) -> list[dict[str, Any]]:
        path = self.folder / DECISIONS
        return parse_decisions(path.read_text(), str(path)) if path.is_file() else []

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError of making the model's folder or a file in it (a file where the repository should be, no
        permission, a read-only file system) as a UserError naming the repository."""
        try:
            yield
        except OSError as e:
            where = e.filename or self.folder
            raise UserError(f"{where}: cannot write to the repository: {e.strerror}") from None

    def _numbered(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except OSError:  # no repository (yet, or any more)
            return []
        numbered = ((version_number(name), name) for name in names)
        return [v for v, name in numbered if v is not None and (self.folder / name).is_dir()]

    def _rename_to_next(self, staging: Path) -> int:
        """Renames `staging` to the first number past every numbered folder (complete or not), the number
        chosen and taken under NUMBERING_LOCK: a publisher that chose a number, then waited (a loaded
        machine) while others published past it and retention removed it, took a removed version's number,
        below the newest. Retention never removes the newest, so a fresh listing's highest number is the
        highest ever given. Where the lock does not hold (a file system without flock), two publishers
        racing for one number still do not share it: the loser's rename fails and it takes the next."""
        fd = without_following(self.folder / NUMBERING_LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held for a listing and a rename; released when fd closes
            while True:
                version = max(self._numbered(), default=0) + 1
                try:
                    os.rename(staging, self.version_folder(version))
                except OSError as e:
                    if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                _fsync_folder(self.folder)
                return version
        finally:
            os.close(fd)


def open_repository(root: str | os.PathLike, model_name: str) -> ModelRepository:
    """The repository at `root`: a local folder, or a folder in object storage (an fsspec URL)."""
    from ..data.storage import is_url, local

    if is_url(str(root)):
        from .object_repository import ObjectRepository

        return ObjectRepository(str(root), model_name)
    return ModelRepository(local(str(root)), model_name)


def check_model_name(model_name: str) -> None:
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise UserError(f"model name {model_name!r}: must be a plain folder name")


def parse_decisions(text: str, where: str) -> list[dict[str, Any]]:
    """promotions.jsonl's records. A line that does not parse (torn by a promoter killed as it wrote) is
    skipped with a warning naming it: the others are still the history."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if line.strip():
                log.warning("%s:%d: not a JSON line (torn by a crash?), skipped: %.80s", where, number, line)
    return records


def version_number(name: str) -> int | None:
    """The version a folder's name gives, or None if it is not ASCII decimal digits: str.isdigit() also
    takes '²', which int() refuses, and '١', which int() reads as 1."""
    return int(name) if name.isascii() and name.isdigit() else None


def marker_name() -> str:
    """The name of this process's marker of the version it serves."""
    return f"{SERVING_MARKER}{socket.gethostname()}-{os.getpid()}"


def ready_record(folder: Path) -> dict[str, Any]:
    """What READY holds: when it was written, and the size and SHA-256 of every file of the version (by its
    path under the version's folder), so that a reader can check that it has the files READY was written
    for (object storage, where the files are uploaded one by one before READY)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != READY):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return {"published": time.time(), "files": files}


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def export_version(
    repository: ModelRepository,
    config: Config,
    *,
    checkpoint: str | None = None,
    format: str = "onnx",
    precision: str = "fp32",
    table_precision: str = "fp32",
    keep: int | None = DEFAULT_KEEP,
) -> int:
    """`export` of `checkpoint` (see export_model) as the repository's next version; returns its number."""
    from .export import export_model

    def export(folder: Path) -> Path:
        return export_model(
            config,
            checkpoint=checkpoint,
            out=str(folder),
            format=format,
            precision=precision,
            table_precision=table_precision,
        )

    return repository.publish(export, keep=keep)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
