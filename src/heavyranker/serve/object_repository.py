"""A model repository in object storage (an fsspec URL: s3://bucket/prefix), with repository.py's layout
and methods.

An object store has no folders and no atomic rename, so a version is made complete by its last object:

1. The publisher claims the next number: it writes `<version>/.claim-<id>`, then lists `<version>/`; if
   anything else is there (another publisher's claim or files), it removes its claim and tries the next
   number. Two publishers that claim at once both see the other and both step on; one that sees only its own
   claim holds the number (the store lists what was written before: S3's lists are strongly consistent).
2. It uploads the version's files (export writes them to a local folder first).
3. It writes `READY` last, holding each file's size and SHA-256 (repository.ready_record), then removes
   its claim.

A reader takes a version only if its READY parses and every file READY names is listed with READY's size;
a half-uploaded version (files, no READY, or a READY that names files not all there) is not one. A server
downloads a version into a local folder and checks each file's SHA-256 against READY before loading it.
Retention removes a version's READY first (it is no version from then on), then its other objects.
promotions.jsonl is read, extended and written whole (an object cannot be appended to): two promoters
writing at the same moment may lose one line, so promote into one object-store repository from one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath
from typing import Any

from ..data.data_time import info_time
from ..data.storage import error_line, filesystem
from ..errors import UserError
from ..urls import redact
from .download_folder import DownloadFolder
from .repository import (
    DECISIONS,
    DEFAULT_KEEP,
    MARKER_TTL_S,
    READY,
    SERVING_MARKER,
    TRITON_CONFIG,
    ModelRepository,
    check_model_name,
    marker_name,
    parse_decisions,
    ready_record,
    sha256_of,
    version_number,
)

log = logging.getLogger(__name__)

CLAIM = ".claim-"
DOWNLOADS = "heavyranker-repository-"  # the local folders' prefix, in the temporary folder
CACHED_VERSIONS = 2  # downloaded versions kept on local disk: the one being loaded and the one before


class ObjectRepository(ModelRepository):
    """The versions of one model (`model_name`) in the object-storage repository at `url`."""

    def __init__(self, url: str, model_name: str):
        check_model_name(model_name)
        self.fs = filesystem(url)  # refuses a URL holding credentials
        self.root = url.rstrip("/")  # type: ignore[assignment]  # a URL here, a Path in ModelRepository
        self.model_name = model_name
        self.folder = f"{self.root}/{model_name}"  # type: ignore[assignment]
        self._path = self.fs._strip_protocol(self.folder)
        self._ready: dict[int, tuple[Any, dict[str, Any]]] = {}  # version -> (READY's ETag, READY's record)
        self._downloads = DownloadFolder(DOWNLOADS)  # sweeps those of killed servers
        self._cache = self._downloads.path

    def version_folder(self, version: int) -> str:  # type: ignore[override]
        return f"{self.folder}/{version}"

    def location(self, version: int) -> str:
        return self.version_folder(version)

    def versions(self) -> list[int]:
        """The complete versions, oldest first: a READY that parses, and every file it names listed with
        its size."""
        listed = _by_version(self._listing(), self._path)
        for gone in self._ready.keys() - listed.keys():  # removed (another process's retention): let go
            del self._ready[gone]
        complete = []
        for version, files in listed.items():
            if READY in files and self._complete(version, files):
                complete.append(version)
        return sorted(complete)

    def ready_stamp(self, version: int) -> object:
        entry = self._ready.get(version)
        return entry[0] if entry else None

    def published(self, version: int) -> float | None:
        entry = self._ready.get(version)
        return entry[1].get("published") if entry else None

    def local_folder(self, version: int) -> Path:
        """The version downloaded into a local folder, each file checked against READY's SHA-256 (a
        UserError if one differs: damaged, or replaced). Keeps the newest CACHED_VERSIONS downloads."""
        if version not in self.versions():  # a fresh look: READY (and so the files) may have changed
            raise UserError(f"{self.version_folder(version)}: not a complete version")
        stamp, record = self._ready[version]
        # Named by READY's stamp too: a number published again (after its version was removed) is new.
        folder = self._cache / f"{version}-{hashlib.sha256(str(stamp).encode()).hexdigest()[:12]}"
        # An object's key may hold '..': downloaded, it would be written anywhere on this host.
        outside = [
            n for n in record["files"] if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts
        ]
        if outside:
            raise UserError(
                f"{self.version_folder(version)}/{READY}: names {outside[0][:100]!r}, outside the version"
            )
        if not folder.is_dir():
            self._download(version, record, folder)
        # A loaded version no longer needs its files (the scorer holds the program): the oldest downloads go.
        downloads = [p for p in self._cache.iterdir() if not p.name.startswith(".")]
        cached = sorted(downloads, key=lambda p: p.stat().st_mtime)
        for stale in [p for p in cached if p != folder][: max(0, len(cached) - CACHED_VERSIONS)]:
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def _download(self, version: int, record: dict[str, Any], folder: Path) -> None:
        """The version's files into `folder`, each checked against READY's SHA-256. Into a staging folder
        first, removed whatever stops the download (the store gone half way, a damaged file): the cache's
        pruning leaves hidden names alone, so a failed download stayed on disk for the server's life."""
        staging = self._cache / f".download-{version}-{uuid.uuid4().hex[:8]}"
        try:
            for name, expected in record["files"].items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self._call(self.fs.get_file, f"{self._path}/{version}/{name}", str(target))
                if sha256_of(target) != expected["sha256"]:
                    raise UserError(
                        f"{self.version_folder(version)}/{name}: its SHA-256 differs from READY's: damaged"
                    )
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, write: Callable[[Path], object], *, keep: int | None = DEFAULT_KEEP) -> int:
        """write(folder) fills a local folder; its files are uploaded under a claimed number, READY last."""
        with tempfile.TemporaryDirectory(prefix="heavyranker-export-") as local:
            write(Path(local))
            record = ready_record(Path(local))
            version, claim = self._claim()
            try:
                for name in record["files"]:
                    self._call(self.fs.put_file, str(Path(local) / name), f"{self._path}/{version}/{name}")
                self._put(f"{version}/{READY}", json.dumps(record) + "\n")
                if TRITON_CONFIG in record["files"]:
                    self._put(TRITON_CONFIG, (Path(local) / TRITON_CONFIG).read_text())
            except BaseException:
                self._remove_version(version)
                raise
            self._call(self.fs.rm_file, claim)
        log.info("published %s version %d in %s", self.model_name, version, redact(self.root))
        if keep is not None:
            self.prune(keep)
        return version

    def prune(self, keep: int, protect: Collection[int] = ()) -> list[int]:
        if keep < 1:
            raise UserError(f"keep {keep}: the repository keeps at least the newest version")
        versions = self.versions()
        kept = set(versions[-keep:]) | set(protect) | set(self.served_versions())
        removed = [v for v in versions if v not in kept]
        for version in removed:
            self._remove_version(version)
            log.info("removed %s version %d (retention: the newest %d)", self.model_name, version, keep)
        return removed

    def mark_served(self, version: int) -> str:  # type: ignore[override]
        self._put(marker_name(), f"{version}\n")
        return self.marker_path()

    def marker_path(self) -> str:  # type: ignore[override]
        return f"{self.folder}/{marker_name()}"

    def unmark_served(self) -> None:
        try:
            self.fs.rm_file(f"{self._path}/{marker_name()}")
        except FileNotFoundError:
            pass

    def served_versions(self) -> list[int]:
        found = []
        now = time.time()
        for path, info in self._listing().items():
            if path.rpartition("/")[2].startswith(SERVING_MARKER) and now - info_time(info) < MARKER_TTL_S:
                try:
                    found.append(int(self.fs.cat_file(path)))
                except (OSError, ValueError):  # removed meanwhile
                    continue
        return found

    def append_decision(self, record: dict[str, Any]) -> None:
        """promotions.jsonl read, extended by one line and written whole (see the module's docstring)."""
        text = self._text(DECISIONS) or ""
        if text and not text.endswith("\n"):  # copied from a folder where a crash tore its last line
            text += "\n"
        self._put(DECISIONS, text + json.dumps(record, sort_keys=True) + "\n")

    def decisions(self) -> list[dict[str, Any]]:
        return parse_decisions(self._text(DECISIONS) or "", f"{redact(self.folder)}/{DECISIONS}")

    def _listing(self) -> dict[str, dict[str, Any]]:
        """Every object under the model's folder (path -> info), listed afresh."""
        self._forget_listings()
        try:
            return self._call(self.fs.find, self._path, detail=True)
        except FileNotFoundError:  # no bucket, or no model folder (yet, or any more)
            return {}

    def _forget_listings(self) -> None:
        """Drops the back-end's cached listings of the model's folder and of every folder below it. s3fs's
        find caches the listing of each folder below the one listed, and only where it has none: the
        invalidation of the model's folder alone left them, so a version's folder listed while only its
        claim was there kept that listing, its READY "not found" (the version never served), and the cache
        grew by a folder per version published in the server's life."""
        below = self._path + "/"
        for path in [p for p in self.fs.dircache if p.startswith(below)]:
            self.fs.dircache.pop(path, None)
        self.fs.invalidate_cache(self._path)

    def _complete(self, version: int, files: dict[str, dict[str, Any]]) -> bool:
        """Whether READY (read once per ETag) parses and names files that are all listed with its sizes."""
        stamp = _etag(files[READY])
        if version not in self._ready or self._ready[version][0] != stamp:
            try:
                record = json.loads(self.fs.cat_file(f"{self._path}/{version}/{READY}"))
                record["sizes"] = {name: int(f["size"]) for name, f in record["files"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return False  # removed meanwhile, or not a READY this module wrote
            self._ready[version] = (stamp, record)
        sizes = self._ready[version][1]["sizes"]
        return all(name in files and files[name]["size"] == size for name, size in sizes.items())

    def _claim(self) -> tuple[int, str]:
        """The next number, held by a claim object (the module's docstring): (version, the claim's path)."""
        while True:
            taken = _by_version(self._listing(), self._path)
            version = max(taken, default=0) + 1
            claim = f"{self._path}/{version}/{CLAIM}{uuid.uuid4().hex}"
            self._call(self.fs.pipe_file, claim, b"")
            self._forget_listings()
            there = self._call(self.fs.find, f"{self._path}/{version}")
            if there == [claim]:
                return version, claim
            self._call(self.fs.rm_file, claim)
            time.sleep(random.uniform(0.01, 0.2))  # two that stepped on together need not meet again

    def _remove_version(self, version: int) -> None:
        """READY first (no version from then on), then the rest."""
        prefix = f"{self._path}/{version}"
        try:
            self.fs.rm_file(f"{prefix}/{READY}")
        except FileNotFoundError:
            pass
        self._ready.pop(version, None)
        self._forget_listings()
        rest = self._call(self.fs.find, prefix)
        if rest:
            self._call(self.fs.rm, rest)

    def _put(self, name: str, text: str) -> None:
        self._call(self.fs.pipe_file, f"{self._path}/{name}", text.encode())

    def _text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(f"{self._path}/{name}").decode()
        except FileNotFoundError:
            return None

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The back-end's call; its own errors (botocore's: not OSErrors) become an OSError in one line."""
        try:
            return method(*args, **kwargs)
        except OSError:
            raise
        except Exception as e:
            raise OSError(f"{redact(self.folder)}: {error_line(e)}") from None


def _by_version(listing: dict[str, dict[str, Any]], model_path: str) -> dict[int, dict[str, dict[str, Any]]]:
    """The listed objects of each numbered folder: version -> (path under the version's folder -> info)."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for path, info in listing.items():
        head, _, rest = path.removeprefix(model_path + "/").partition("/")
        version = version_number(head)
        if version is not None and rest:
            found.setdefault(version, {})[rest] = info
    return found


def _etag(info: dict[str, Any]) -> object:
    return info.get("ETag") or info.get("etag") or (info.get("size"), str(info.get("LastModified")))
