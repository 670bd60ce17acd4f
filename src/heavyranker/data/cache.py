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
Opening an entry verifies its checksums: one changed on disk is removed and built again, with a warning.
What is not ours (data/cache_files.py) is never read, written through, renamed or removed: where it holds
an entry's place (a link left there, say), the file's entry is built in a temporary folder each time it is
read, and a warning says so.
Missing entries are built by worker processes, one file each, in the order the reading needs them. They
share nothing with the reading process but the page cache of the files they write: building never takes
its GIL (reading and decoding hold it for about 5% of their time, bench/data_throughput.py: little, but it
would land in the training step's Python code) and hands nothing back to pickle."""

from __future__ import annotations

import logging
import multiprocessing
import os
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
from .cache_entry import TEMPORARY, BadEntry, Entry, Fingerprint, NotOurs, build_entry
from .cache_files import describe, state
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
    would pass. An entry's checksums are verified each time it is mapped: once per epoch of a split of more
    files than that, once per run of a smaller one."""

    def __init__(self, data: DataConfig, labels: bool, where: str):
        self.folder = Path(cache_folder(data))
        self.where = where
        self._data = data
        self._labels = labels
        self._fingerprint = Fingerprint(data, labels)
        self._workers = data.cache_workers or default_workers()
        self._keys: dict[str, str] = {}  # path -> key, from its size and version when first seen
        self._cached: set[str] = set()  # paths whose entries are whole
        self._foreign: set[str] = set()  # paths whose entry's place holds something not ours (reported)
        self._mapped: OrderedDict[str, Entry] = OrderedDict()  # the last opened, the newest last
        self._building: dict[str, tuple[Future, Path]] = {}
        self._pool: ProcessPoolExecutor | None = None
        self._stop = threading.Event()  # ends a build in the reading thread when the reading stops

    def start(self, files: list[str]) -> None:
        self._stop.clear()
        wanted = [path for path in files if path not in self._cached and path not in self._building]
        missing = []
        for path in wanted:
            if self._load(path, verify=False) is None:  # verified when opened
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
        """The entry of `path`, mapped, its checksums verified; built first where it is missing, not whole or
        not as written."""
        if (entry := self._mapped.get(path)) is not None:
            self._mapped.move_to_end(path)
            return entry
        if path in self._building:
            entry = self._load_built(path, self._wait(path))
        elif (entry := self._load(path)) is None:
            self._make_folder()
            temporary, final = str(self._temporary(self._key(path))), str(self.folder / self._key(path))
            built = build_entry(self._data, self._labels, path, temporary, final, self._stop.is_set)
            entry = self._load_built(path, built)
        self._cached.add(path)
        self._mapped[path] = entry
        if len(self._mapped) > MAPPED_ENTRIES:
            self._mapped.popitem(last=False)
        return entry

    def _key(self, path: str) -> str:
        if path not in self._keys:
            self._keys[path] = self._fingerprint.key(path)
        return self._keys[path]

    def _wait(self, path: str) -> str:
        """Where a build process put the entry of `path`."""
        future, _ = self._building.pop(path)
        try:
            built = future.result()
        except BrokenProcessPool:
            raise UserError(
                f"{self.where}: a process building the decoded cache ended before {path} was built: "
                "killed, or (from a script) its top level is not under `if __name__ == '__main__':`, "
                "which every build process runs again; cache_workers: 1 builds in this process"
            ) from None
        if not self._building:
            self._end_pool()
        return built

    def _load(self, path: str, verify: bool = True) -> Entry | None:
        """The entry of `path`; None when there is none, when its place holds something not ours (reported
        once), or when it is not whole or not as written (then it is removed, to be built again: a disk
        that filled up, a file truncated or changed by hand, a fault)."""
        key = self._key(path)
        folder = self.folder / key
        found = state(folder)
        if found == "foreign":
            self._report_foreign(path, folder)
        if found not in ("entry", "building"):
            return None
        try:
            if found == "building":
                raise BadEntry("is not whole (it has no manifest)")
            return Entry.load(folder, verify)
        except NotOurs:  # put there since state() looked
            self._report_foreign(path, folder)
            return None
        except BadEntry as e:
            log.warning("%s: the cache entry %s %s: decoding %s again", self.where, folder, e, path)
            aside = self._temporary(key)  # out of the way at once, for a reader in another process
            try:
                folder.rename(aside)
            except OSError:  # removed by another process meanwhile
                return None
            shutil.rmtree(aside, ignore_errors=True)
            return None

    def _report_foreign(self, path: str, folder: Path) -> None:
        """Warns, once per path, that something not ours holds the place of its entry."""
        if path not in self._foreign:
            self._foreign.add(path)
            log.warning(
                "%s: %s, the cache entry of %s, is %s: left alone, and that file's entry is built in a "
                "temporary folder each time it is read, until that is removed",
                self.where,
                folder,
                path,
                describe(folder),
            )

    def _load_built(self, path: str, built: str) -> Entry:
        """The entry build_entry just put at `built`: its place, or a temporary folder (removed once
        mapped) where that place holds something not ours."""
        try:
            return Entry.load(Path(built))
        except (BadEntry, NotOurs) as e:
            raise DataError(f"{path}: its cache entry in {built} {e}, just after it was built") from None
        finally:
            if built != str(self.folder / self._key(path)):
                shutil.rmtree(built, ignore_errors=True)

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
        found = _Survey(Path(folder))
        line = f"{folder}: {len(found.entries)} entries, {found.entry_bytes / 2**20:,.1f} MiB"
        if found.build_bytes:
            line += f"; {found.build_bytes / 2**20:,.1f} MiB left by killed runs"
        lines.append(line + found.left_alone())
    for where, data in splits.items():
        files, _ = shard_files(data, 0, 1, where)
        fingerprint = Fingerprint(data, labels=True)
        folder = Path(cache_folder(data))
        cached = sum(state(folder / fingerprint.key(path)) == "entry" for path in files)
        lines.append(f"{where}: {cached} of {len(files)} files cached (cache: {str(data.cache).lower()})")
    return lines


def clear_cache(splits: Mapping[str, DataConfig]) -> list[str]:
    """Removes the entries, and what killed runs left, in the cache folders the splits use (a config's
    data_sections); what was removed, one line each. Anything not ours is left alone and counted (links
    named): cache_dir may name a folder by mistake."""
    folders = dict.fromkeys(cache_folder(data) for data in splits.values())
    lines = []
    for folder in map(Path, folders):
        found = _Survey(folder)
        for child in found.entries + found.builds:
            shutil.rmtree(child)  # a folder, not a link (rmtree refuses those)
        removed = (found.entry_bytes + found.build_bytes) / 2**20
        line = f"{folder}: removed {len(found.entries)} entries, {removed:,.1f} MiB"
        lines.append(line + found.left_alone())
    return lines


class _Survey:
    """What a cache folder holds, by what marks it (cache_files.state), never by a name's shape: our
    entries, our builds (running, or left by killed runs), their bytes, and what is not ours."""

    def __init__(self, folder: Path):
        self.entries: list[Path] = []
        self.builds: list[Path] = []
        self.entry_bytes = self.build_bytes = 0
        self.links: list[str] = []
        self.others = 0
        for child in sorted(folder.iterdir()) if folder.is_dir() else ():
            found = state(child)
            if found == "entry":
                self.entries.append(child)
                self.entry_bytes += _bytes(child)
            elif found == "building":
                self.builds.append(child)
                self.build_bytes += _bytes(child)
            elif child.is_symlink():
                self.links.append(child.name)
            else:
                self.others += 1

    def left_alone(self) -> str:
        """'; left alone 2 other files and folders and the link X', or nothing."""
        parts = [f"{self.others} other files and folders"] if self.others else []
        if self.links:
            parts.append(f"the link{'s' if len(self.links) > 1 else ''} {', '.join(self.links)}")
        return f"; left alone {' and '.join(parts)}" if parts else ""


def _bytes(folder: Path) -> int:
    """The bytes of the files in one of our folders (flat), links not followed."""
    with os.scandir(folder) as children:
        files = [c for c in children if c.is_file(follow_symlinks=False)]
        return sum(c.stat(follow_symlinks=False).st_size for c in files)
