"""`cache: true`: every data file decoded and preprocessed once, kept on local disk as memory-mapped columns.

An entry is one data file: <cache folder>/<key>/ holds a raw array file per column (rows in record order,
a damaged record's row zeros) and manifest.json (the columns' dtypes and shapes, the records read, which
decoded, the damage met, the schema defaults filled). Its key hashes everything that decides those rows:
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
Files are built in worker processes, one file each: decoding holds the GIL for a large part of each record,
and processes share nothing but the page cache of the files they write."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from multiprocessing.pool import AsyncResult, Pool
from pathlib import Path

import numpy as np

from ..config import Config
from ..config.data import DataConfig
from ..errors import DataError, UserError
from .batch import Rows
from .columns import Columns
from .damage import Damage
from .files import shard_files
from .preprocess import NegativeDownsampler, Preprocessor, build_preprocessors
from .storage import file_version, is_url
from .tfrecord import read_records

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when what an entry holds, or how it is computed, changes
CHUNK = 4096  # records decoded at a time while building an entry
TEMPORARY = ".building-"  # prefix of the folders entries are written in
STORED_LABELS = "stored_labels"  # the labels as stored, for downsample_negatives after rectify_labels
FINAL_LABELS = "final_labels"  # Rows.extras of gather: the rectified labels, while downsampling goes by those


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


@dataclass(frozen=True)
class Entry:
    """One data file's cached rows, memory-mapped: `columns` name -> [records, ...]; valid[i] says whether
    record i decoded (its row is in every column) or was damaged (zeros)."""

    path: str
    columns: dict[str, np.ndarray]
    valid: np.ndarray
    damage: dict  # {"file": message or None, "records": count, "messages": the first few}
    defaults_filled: dict[str, int]

    def __len__(self) -> int:
        return len(self.valid)

    @classmethod
    def load(cls, folder: Path) -> Entry | None:
        """The entry in `folder`; None when there is none, or it is not whole (a file cut short)."""
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            records = manifest["records"]
            columns = {}
            for column in manifest["columns"]:
                shape, dtype = (records, *column["shape"]), np.dtype(column["dtype"])
                file, size = folder / column["file"], int(np.prod(shape)) * dtype.itemsize
                if file.stat().st_size != size:
                    return None
                # numpy cannot map an empty file (no records, or labels [N, 0] when reading none)
                columns[column["name"]] = (
                    np.memmap(file, dtype, "r", shape=shape) if size else np.empty(shape, dtype)
                )
            valid = np.fromfile(folder / "valid.bin", dtype=np.bool_)
        except (OSError, ValueError, KeyError):
            return None
        if len(valid) != records:
            return None
        return cls(manifest["source"], columns, valid, manifest["damage"], manifest["defaults_filled"])


class Fingerprint:
    """What, besides a file itself, decides its cached rows; key(path) names the file's entry."""

    def __init__(self, data: DataConfig, labels: bool):
        schema = data.seg_dense_schema
        preprocess = data.preprocess.model_dump(exclude={"downsample_negatives"}) if data.preprocess else None
        truncate = data.preprocess and data.preprocess.truncate_and_slice
        masks = [truncate.continuous_feature_mask_path, truncate.binary_feature_mask_path] if truncate else []
        facts = {
            "format": FORMAT,
            "schema": _file_hash(schema.schema_path),
            "features": schema.model_dump(exclude={"schema_path"}),
            "tasks": {t: data.tasks[t].model_dump() for t in data.tasks} if labels else None,
            "preprocess": preprocess,
            "masks": [_file_hash(m) if m else None for m in masks],
        }
        self.digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def key(self, path: str) -> str:
        try:
            version = file_version(path)
        except FileNotFoundError:
            raise DataError(f"{path}: the file is gone (it was listed when the run started)") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
        where = path if is_url(path) else os.path.abspath(path)
        file = json.dumps({"path": where, **version}, sort_keys=True)
        return hashlib.sha256(f"{self.digest}\n{file}".encode()).hexdigest()[:40]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class DecodedCache:
    """The entries of one dataset's files in `folder`, built on first use: start(files) begins building
    the missing ones in the order given, on `workers` processes (workers=1: in the caller's thread, at
    open); open(path) waits for a file's entry and returns it. close() stops the builds."""

    def __init__(self, data: DataConfig, labels: bool, where: str):
        self.folder = Path(cache_folder(data))
        self.where = where
        self._data = data
        self._labels = labels
        self._fingerprint = Fingerprint(data, labels)
        self._workers = data.cache_workers or default_workers()
        self._entries: dict[str, Entry] = {}
        self._building: dict[str, tuple[AsyncResult, Path]] = {}
        self._pool: Pool | None = None
        self._stop = threading.Event()  # ends a build in the reading thread when the reading stops

    def start(self, files: list[str]) -> None:
        self._stop.clear()
        wanted = [path for path in files if path not in self._entries and path not in self._building]
        keys = {path: self._fingerprint.key(path) for path in wanted}
        missing = []
        for path, key in keys.items():
            entry = self._load(key)
            if entry is None:
                missing.append(path)
            else:
                self._entries[path] = entry
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
                # spawn, not fork: forking a process that runs threads can deadlock the child
                context = multiprocessing.get_context("spawn")
                self._pool = context.Pool(min(self._workers, len(missing)), initializer=_lowest_priority)
            for path in missing:
                temporary = self._temporary(keys[path])
                args = (self._data, self._labels, path, str(temporary), str(self.folder / keys[path]))
                self._building[path] = (self._pool.apply_async(build_entry, args), temporary)

    def open(self, path: str) -> Entry:
        if (entry := self._entries.get(path)) is not None:
            return entry
        key = self._fingerprint.key(path)
        if path in self._building:
            result, _ = self._building.pop(path)
            result.get()
            if not self._building:
                self._end_pool()
        elif self._load(key) is None:
            self._make_folder()
            temporary, final = str(self._temporary(key)), str(self.folder / key)
            build_entry(self._data, self._labels, path, temporary, final, self._stop.is_set)
        entry = Entry.load(self.folder / key)
        if entry is None:
            raise DataError(f"{path}: its cache entry in {self.folder / key} was removed while in use")
        self._entries[path] = entry
        return entry

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
            self._pool.terminate()
            self._pool.join()
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


class _CollectedDamage(Damage):
    """The damage met while building an entry, kept for its manifest rather than logged: the reading
    process reports it (Damage.replay) every time it reads the entry, as for a file read uncached."""

    def __init__(self) -> None:
        super().__init__()
        self.summary: dict = {"file": None, "records": 0, "messages": []}

    def file(self, path: str, error: DataError) -> None:
        self.summary["file"] = str(error)

    def record(self, path: str, error: DataError) -> None:
        self.summary["records"] += 1
        if len(self.summary["messages"]) < 3:
            self.summary["messages"].append(str(error))


class _Stopped(Exception):
    """The reading ended while the entry was being built in its thread."""


def build_entry(
    data: DataConfig,
    labels: bool,
    path: str,
    temporary: str,
    final: str,
    stopped: Callable[[], bool] = lambda: False,
) -> None:
    """Decodes and preprocesses the file at `path` into an entry at `final`, written in `temporary` first.
    Damage raises DataError, or with ignore_data_errors is written into the entry. A full disk is a
    UserError. Another process that built the same entry first wins."""
    damage = _CollectedDamage() if data.ignore_data_errors else None
    preprocessors = [p for p in build_preprocessors(data.preprocess, labels=labels) if _row_by_row(p)]
    keep_stored_labels = labels and _needs_stored_labels(data)
    columns = Columns(data, preprocessors, labels, damage)
    folder = Path(temporary)
    folder.mkdir()
    try:
        with _ColumnWriter(folder) as writer:
            records = _records(path, damage)
            first = 0
            while chunk := list(islice(records, CHUNK)):
                if stopped():
                    raise _Stopped
                items = [(record, path, first + i) for i, record in enumerate(chunk)]
                first += len(chunk)
                writer.append(_decode(columns, preprocessors, items, keep_stored_labels), len(chunk))
            writer.finish(path, damage.summary if damage else None, columns.defaults_filled())
        try:
            folder.rename(final)
        except OSError:  # built by another process meanwhile: theirs is the same
            shutil.rmtree(folder, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise UserError(f"cache: cannot write {path}'s entry in {folder.parent}: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _row_by_row(preprocessor: Preprocessor) -> bool:
    return not isinstance(preprocessor, NegativeDownsampler)


def _needs_stored_labels(data: DataConfig) -> bool:
    return bool(data.preprocess and data.preprocess.downsample_negatives and data.preprocess.rectify_labels)


def _records(path: str, damage: Damage | None) -> Iterator[bytes]:
    try:
        yield from read_records(path)
    except DataError as e:
        if damage is None:
            raise
        damage.file(path, e)


def _decode(
    columns: Columns, preprocessors: list[Preprocessor], items: list, keep_stored_labels: bool
) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    """The cached columns of the decoded records of `items`, and their positions in `items`."""
    decoded = columns.decode(items)
    if decoded is None:
        return None
    rows = columns.rows(decoded[0])
    stored = rows.labels.copy()
    for preprocessor in preprocessors:
        rows = preprocessor.apply(rows)
    arrays = {f"features/{name}": values for name, values in rows.features.items()}
    arrays |= {"labels": rows.labels, "weights": rows.weights.astype(np.float32, copy=False)}
    if keep_stored_labels:
        arrays[STORED_LABELS] = stored
    return arrays, decoded[1]


class _ColumnWriter:
    """Appends rows, chunk by chunk, to one raw file per column; a damaged record's row is zeros."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, tuple] = {}  # name -> (open file, dtype, shape of one row)
        self.valid = open(folder / "valid.bin", "wb")
        self.records = 0

    def __enter__(self) -> _ColumnWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.valid.close()
        for file, _, _ in self.files.values():
            file.close()

    def append(self, decoded: tuple[dict[str, np.ndarray], np.ndarray] | None, n: int) -> None:
        valid = np.zeros(n, dtype=np.bool_)
        if decoded is not None:
            arrays, kept = decoded
            valid[kept] = True
            for name, values in arrays.items():
                if name not in self.files:  # its rows so far are all damaged ones: zeros
                    file = open(self.folder / f"column-{len(self.files)}.bin", "wb")
                    self.files[name] = (file, values.dtype, values.shape[1:])
                    np.zeros((self.records, *values.shape[1:]), values.dtype).tofile(file)
                file, dtype, shape = self.files[name]
                full = values if len(kept) == n else np.zeros((n, *shape), dtype)
                full[kept] = values
                np.ascontiguousarray(full, dtype=dtype).tofile(file)
        for name, (file, dtype, shape) in self.files.items():
            if decoded is None or name not in decoded[0]:
                np.zeros((n, *shape), dtype).tofile(file)
        valid.tofile(self.valid)
        self.records += n

    def finish(self, path: str, damage: dict | None, defaults_filled: Counter[str]) -> None:
        columns = [
            {"name": name, "file": Path(file.name).name, "dtype": dtype.str, "shape": list(shape)}
            for name, (file, dtype, shape) in self.files.items()
        ]
        manifest = {
            "format": FORMAT,
            "source": path,
            "records": self.records,
            "columns": columns,
            "damage": damage or {"file": None, "records": 0, "messages": []},
            "defaults_filled": dict(defaults_filled),
        }
        (self.folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def gather(items: list[tuple[Entry, str, int]], tasks: tuple[str, ...]) -> Rows | None:
    """The cached rows of `items` (entry, path, record index), in their order, damaged records left out;
    None when every one is damaged. With stored labels, Rows.labels are those and the rectified ones wait
    in Rows.extras: see with_final_labels."""
    entries = {id(entry): entry for entry, _, _ in items}
    which = np.fromiter((id(entry) for entry, _, _ in items), np.int64, len(items))
    index = np.fromiter((i for _, _, i in items), np.int64, len(items))
    valid = np.empty(len(items), dtype=np.bool_)
    for key, entry in entries.items():
        valid[which == key] = entry.valid[index[which == key]]
    if not valid.any():
        return None
    which, index = which[valid], index[valid]
    parts = [(which == key, entry) for key, entry in entries.items() if entry.valid.any()]
    out = {}
    for name, sample in parts[0][1].columns.items():
        values = out[name] = np.empty((len(index), *sample.shape[1:]), dtype=sample.dtype)
        for mine, entry in parts:
            values[mine] = entry.columns[name][index[mine]]
    features = {name.removeprefix("features/"): v for name, v in out.items() if name.startswith("features/")}
    if STORED_LABELS in out:  # downsample_negatives goes by the stored labels
        return Rows(features, out[STORED_LABELS], out["weights"], tasks, {FINAL_LABELS: out["labels"]})
    return Rows(features, out["labels"], out["weights"], tasks)


def with_final_labels(rows: Rows) -> Rows:
    """Rows from gather, after downsample_negatives: the rectified labels back in place."""
    if FINAL_LABELS in rows.extras:
        rows.labels = rows.extras.pop(FINAL_LABELS)
    return rows


def describe_cache(config: Config) -> list[str]:
    """`heavyranker data cache`: for each cache folder the config's splits use, its entries and size, and
    per split how many of its files are cached under the current config."""
    splits = {"train_data": config.train_data} | {
        f"validation_data.{name}": data for name, data in config.validation_data.items()
    }
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


def clear_cache(config: Config) -> list[str]:
    """Removes everything in the cache folders the config's splits use; what was removed, one line each."""
    folders = dict.fromkeys(cache_folder(d) for d in [config.train_data, *config.validation_data.values()])
    lines = []
    for folder in map(Path, folders):
        entries, size, leftover = _folder_sizes(folder)
        for child in folder.iterdir() if folder.is_dir() else ():
            shutil.rmtree(child)
        lines.append(f"{folder}: removed {entries} entries, {(size + leftover) / 2**20:,.1f} MiB")
    return lines


def _folder_sizes(folder: Path) -> tuple[int, int, int]:
    """(entries, their bytes, bytes of the temporary folders of killed runs)."""
    entries = size = leftover = 0
    for child in folder.iterdir() if folder.is_dir() else ():
        bytes_ = sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        if child.name.startswith(TEMPORARY):
            leftover += bytes_
        else:
            entries += 1
            size += bytes_
    return entries, size, leftover
