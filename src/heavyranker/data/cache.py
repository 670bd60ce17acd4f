"""`cache: true`: every data file decoded and preprocessed once, kept on local disk as memory-mapped columns.

An entry is one data file, in <cache folder>/<key>/ (layout: data/cache_entry.py). Its key hashes
everything that decides its rows:
the file (path or URL, size, modification time or ETag), the schema and mask files' contents, the renamed
and masked features, the tasks and their sampling rates, the deterministic preprocessors' configs, whether
labels are read, and FORMAT. A changed input or config gets a new key; the old entry stays until cleared.

What is cached is the output of everything deterministic: decoding, truncate_and_slice, downcast,
rectify_labels and extract_features, which all work row by row. downsample_negatives depends on which
records share a batch, so it runs on every batch read from the cache, on the labels as stored (it runs
first when uncached): so the cache keeps those labels beside the rectified ones when both are configured.
The record order (file shuffle, interleave, shuffle buffer) is made from (file, record index) pairs as
before, so cached and uncached reading give the same batches for a seed.

An entry is written into a temporary folder and renamed into place once complete: a killed run leaves a
temporary folder (reported and removed by `heavyranker data cache --clear`), never a half-written entry.
Missing entries are built by worker processes, one file each, in the order the reading needs them. They
share nothing with the reading process but the page cache of the files they write: building never takes
its GIL (reading and decoding hold it for about 5% of their time, bench/data_throughput.py: little, but it
would land in the training step's Python code) and hands nothing back to pickle."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ..config.data import DataConfig
from ..errors import DataError, UserError
from .cache_entry import TEMPORARY, Entry, Fingerprint, build_entry
from .sources.files import shard_files

log = logging.getLogger(__name__)

MAPPED_ENTRIES = 64  # entries kept mapped after their file is read (see DecodedCache)


def default_folder() -> str:
    """$HEAVYRANKER_CACHE, else heavyranker/decoded under the user's cache folder ($XDG_CACHE_HOME or
    ~/.cache)."""
    if folder := os.environ.get("HEAVYRANKER_CACHE"):
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "heavyranker", "decoded")


def cache_folder(data: DataConfig) -> str:
    return data.cache_dir or default_folder()


def default_workers() -> int:
    """The CPUs this process may use, shared with the other ranks on this machine (torchrun sets
    LOCAL_WORLD_SIZE)."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


class DecodedCache:
    """The entries of one dataset's files in `folder`, built on first use: start(files) begins building
    the missing ones in the order given, on `workers` processes (workers=1: in the caller's thread, at
    open); open(path) waits for a file's entry and returns it, mapped. close() stops the builds.

    The MAPPED_ENTRIES entries opened last stay mapped, for the next epoch of a small split (mapping every
    entry again each epoch cost about 15% of the cached read's examples per CPU-second, on 8 files); the
    others are unmapped once the reading drops them. Not every entry of a split: an entry is a mapping per
    column, and the kernel allows a process about 65,000 (vm.max_map_count), which a split of 10,000 files
    would pass."""

    def __init__(self, data: DataConfig, labels: bool, where: str):
        self.folder = Path(cache_folder(data))
        self.where = where
        self._data = data
        self._labels = labels
        self._fingerprint = Fingerprint(data, labels)
        self._workers = data.cache_workers or default_workers()
        self._keys: dict[str, str] = {}  # path -> key, from its size and version when first seen
        self._cached: set[str] = set()  # paths whose entries are whole
        self._mapped: OrderedDict[str, Entry] = OrderedDict()  # the last opened, the newest last
        self._building: dict[str, tuple[Future, Path]] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._stop = threading.Event()  # ends a build in the reading thread when the reading stops

    def start(self, files: list[str]) -> None:
        self._stop.clear()
        wanted = [path for path in files if path not in self._cached and path not in self._building]
        missing = []
        for path in wanted:
            if self._load(self._key(path)) is None:
                missing.append(path)
            else:
                self._cached.add(path)
        log.info(
            "%s: reading the decoded cache in %s: %d of %d files cached%s",
            self.where,
            self.folder,
            len(files) - len(missing),
            len(files),
            f", decoding {len(missing)} into it on {min(self._workers, len(missing))} processes"
            if missing and self._workers > 1
            else f", decoding {len(missing)} into it as they are read"
            if missing
            else "",
        )
        if missing and self._workers > 1:
            self._make_folder()
            if self._pool is None:
                # Not fork: forking a process that runs threads can deadlock the child. The fork server is a
                # fresh process that imports the builder once; workers fork from it, so a pool starts in
                # milliseconds rather than the 2 s each spawned worker takes to import torch. Not
                # multiprocessing.Pool: it replaces a worker that dies at start forever, where this
                # executor fails the builds (BrokenProcessPool).
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([build_entry.__module__])
                workers = min(self._workers, len(missing))
                self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_lowest_priority)
            for path in missing:
                temporary = self._temporary(self._keys[path])
                args = (self._data, self._labels, path, str(temporary), str(self.folder / self._keys[path]))
                self._building[path] = (self._pool.submit(build_entry, *args), temporary)

    def open(self, path: str) -> Entry:
        if (entry := self._mapped.get(path)) is not None:
            self._mapped.move_to_end(path)
            return entry
        key = self._key(path)
        if path in self._building:
            future, _ = self._building.pop(path)
            try:
                future.result()
            except BrokenProcessPool:
                raise UserError(
                    f"{self.where}: a process building the decoded cache ended before {path} was built: "
                    "killed, or (from a script) its top level is not under `if __name__ == '__main__':`, "
                    "which every build process runs again; cache_workers: 1 builds in this process"
                ) from None
            if not self._building:
                self._end_pool()
        elif path not in self._cached and self._load(key) is None:
            self._make_folder()
            temporary, final = str(self._temporary(key)), str(self.folder / key)
            build_entry(self._data, self._labels, path, temporary, final, self._stop.is_set)
        entry = Entry.load(self.folder / key)
        if entry is None:
            raise DataError(f"{path}: its cache entry in {self.folder / key} was removed while in use")
        self._cached.add(path)
        self._mapped[path] = entry
        if len(self._mapped) > MAPPED_ENTRIES:
            self._mapped.popitem(last=False)
        return entry

    def _key(self, path: str) -> str:
        if path not in self._keys:
            self._keys[path] = self._fingerprint.key(path)
        return self._keys[path]

    def _load(self, key: str) -> Entry | None:
        """The entry of `key`; None when there is none, or it is not whole (then it is removed, to be built
        again: a disk that filled up, a file truncated by hand)."""
        folder = self.folder / key
        entry = Entry.load(folder)
        if entry is None and folder.exists():
            log.warning("%s: the cache entry %s is not whole: decoding its file again", self.where, folder)
            aside = self._temporary(key)  # out of the way at once, for a reader in another process
            folder.rename(aside)
            shutil.rmtree(aside, ignore_errors=True)
        return entry

    def close(self) -> None:
        """Stops the builds still running; their temporary folders are removed."""
        self._stop.set()
        self._end_pool()
        for _, temporary in self._building.values():
            shutil.rmtree(temporary, ignore_errors=True)
        self._building.clear()

    def _end_pool(self) -> None:
        if self._pool is not None:
            # Builds still running are stopped, not awaited. ProcessPoolExecutor.terminate_workers() comes
            # with Python 3.14; until then its table of processes.
            processes = list(self._pool._processes.values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            for process in processes:
                process.join()
            self._pool = None

    def _make_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.where}.cache_dir: cannot make {self.folder}: {e.strerror}") from None

    def _temporary(self, key: str) -> Path:
        return self.folder / f"{TEMPORARY}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _lowest_priority() -> None:
    """Build processes yield to the model's threads, as the data threads do (pipeline._yield_to_the_model)."""
    os.nice(19)


def describe_cache(splits: Mapping[str, DataConfig]) -> list[str]:
    """`heavyranker data cache`: for each cache folder the splits use (dotted path -> data config: a config's
    data_sections), its entries and size, and per split how many of its files are cached under the current
    config."""
    lines = []
    for folder in dict.fromkeys(cache_folder(data) for data in splits.values()):
        entries, size, leftover = _folder_sizes(Path(folder))
        line = f"{folder}: {entries} entries, {size / 2**20:,.1f} MiB"
        lines.append(line + (f"; {leftover / 2**20:,.1f} MiB left by killed runs" if leftover else ""))
    for where, data in splits.items():
        files, _ = shard_files(data, 0, 1, where)
        fingerprint = Fingerprint(data, labels=True)
        folder = Path(cache_folder(data))
        cached = sum((folder / fingerprint.key(path) / "manifest.json").is_file() for path in files)
        lines.append(f"{where}: {cached} of {len(files)} files cached (cache: {str(data.cache).lower()})")
    return lines


def clear_cache(splits: Mapping[str, DataConfig]) -> list[str]:
    """Removes the entries, and what killed runs left, in the cache folders the splits use (a config's
    data_sections); what was removed, one line each. Anything else there is left alone: cache_dir may name a
    folder by mistake."""
    folders = dict.fromkeys(cache_folder(data) for data in splits.values())
    lines = []
    for folder in map(Path, folders):
        entries, size, leftover = _folder_sizes(folder)
        others = 0
        for child in folder.iterdir() if folder.is_dir() else ():
            if _is_ours(child.name):
                shutil.rmtree(child)
            else:
                others += 1
        line = f"{folder}: removed {entries} entries, {(size + leftover) / 2**20:,.1f} MiB"
        lines.append(line + (f"; left alone {others} other files and folders" if others else ""))
    return lines


_ENTRY = re.compile(r"[0-9a-f]{40}")  # Fingerprint.key
_BUILDING = re.compile(re.escape(TEMPORARY) + r"[0-9a-f]{40}-\d+-[0-9a-f]{8}")  # DecodedCache._temporary


def _is_ours(name: str) -> bool:
    """An entry's or a build's name: the only things in a cache folder that report and clear touch."""
    return bool(_ENTRY.fullmatch(name) or _BUILDING.fullmatch(name))


def _folder_sizes(folder: Path) -> tuple[int, int, int]:
    """(entries, their bytes, bytes of the temporary folders of killed runs); nothing else is looked at."""
    entries = size = leftover = 0
    for child in folder.iterdir() if folder.is_dir() else ():
        if not _is_ours(child.name):
            continue
        bytes_ = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        if child.name.startswith(TEMPORARY):
            leftover += bytes_
        else:
            entries += 1
            size += bytes_
    return entries, size, leftover
