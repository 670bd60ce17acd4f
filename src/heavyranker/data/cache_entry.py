"""One data file in the decoded cache (data/cache.py): its layout on disk, its key, how it is built and how
batches are gathered from entries.

An entry is a folder (data/cache_files.py: the marker that makes it ours, written first): a raw array file
per column (rows in record order, a damaged record's row zeros), valid.bin (whether each record decoded) and
manifest.json (the columns' dtypes, shapes and crc32 checksums, the records read, the damage met, the schema
defaults filled), written last. Columns are features/NAME after the deterministic preprocessing, labels
(rectified), weights and, when downsample_negatives and rectify_labels are both configured, the labels as
stored, which downsampling goes by.

Opening an entry for reading verifies every column's checksum, streaming over its memory map, and that its
labels and flags are 0 or 1, as decoding checks them: bytes changed on disk, by hand or by a fault, are
never read as if nothing had happened. What that costs the cached read: bench/data_throughput.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..config.data import DataConfig
from ..errors import DataError, UserError
from .batch import Rows
from .cache_files import (
    FORMAT_NAME,
    MANIFEST,
    VERSION,
    checksum,
    create,
    describe_os_error,
    map_file,
    mark,
    open_folder,
    read_small,
    state,
)
from .columns import FLAGS, Columns
from .damage import Damage
from .preprocess import NegativeDownsampler, Preprocessor, build_preprocessors
from .sources import file_format
from .storage import file_version, is_url

FORMAT = f"{FORMAT_NAME}/{VERSION}"  # in every manifest and every key
CHUNK = 4096  # records decoded at a time while building an entry
TEMPORARY = ".building-"  # prefix of the folders entries are written in
STORED_LABELS = "stored_labels"  # the labels as stored, for downsample_negatives after rectify_labels
ZERO_OR_ONE = {"labels": "label", STORED_LABELS: "label", f"features/{FLAGS}": "flag"}  # column -> what
FINAL_LABELS = "final_labels"  # Rows.extras of gather: the rectified labels, while downsampling goes by those


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
    def load(cls, folder: Path, verify: bool = True) -> Entry:
        """The entry in `folder` (state "entry"), mapped; with `verify`, its checksums, labels and flags
        checked. BadEntry when it is not whole (a file cut short, a disk that filled up) or, verified, not as
        written; NotOurs when a link or a file is at `folder` now. No file is opened through a link: the
        folder is opened as it is checked, and its files through that descriptor."""
        try:
            fd = open_folder(folder)
        except OSError as e:
            raise NotOurs(f"is no longer a folder ({describe_os_error(e)})") from None
        try:
            return cls._load(fd, verify)
        finally:
            os.close(fd)

    @classmethod
    def _load(cls, folder: int, verify: bool) -> Entry:
        try:
            manifest = json.loads(read_small(folder, MANIFEST))
            if manifest["format"] != FORMAT:
                raise BadEntry(f"is of format {manifest['format']!r}, not {FORMAT!r}")
            records = manifest["records"]
            columns = {}
            for column in manifest["columns"]:
                shape, dtype = (records, *column["shape"]), np.dtype(column["dtype"])
                mapped = map_file(folder, column["file"], int(np.prod(shape)) * dtype.itemsize)
                if verify and checksum(mapped) != column["crc32"]:
                    raise BadEntry(f"changed on disk: column {column['name']} fails its crc32")
                # numpy cannot map an empty file (no records, or labels [N, 0] when reading none). An
                # ndarray on the map: memmap's Python __getitem__ took a third of gather's time.
                values = np.empty(shape, dtype) if mapped is None else np.frombuffer(mapped, dtype)
                columns[column["name"]] = values.reshape(shape)
                if verify:  # just after its checksum, while the column's bytes are in the CPU's caches
                    _check_zero_or_one(column["name"], values)
            valid_bytes = read_small(folder, "valid.bin")
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = describe_os_error(e) if isinstance(e, OSError) else e
            raise BadEntry(f"is not whole ({reason})") from None
        if len(valid_bytes) != records:
            raise BadEntry(f"is not whole (valid.bin holds {len(valid_bytes)} records, not {records})")
        if verify:
            if checksum(valid_bytes) != manifest["valid_crc32"]:
                raise BadEntry("changed on disk: valid.bin fails its crc32")
        valid = np.frombuffer(valid_bytes, np.bool_)
        return cls(manifest["source"], columns, valid, manifest["damage"], manifest["defaults_filled"])


class BadEntry(Exception):
    """An entry of ours that cannot be read: it is removed and built again. The message completes "the
    cache entry FOLDER ..."."""


class NotOurs(Exception):
    """What is at an entry's place is not a folder (a link put there since it was looked at, say): left
    alone, as cache_files.state's "foreign". The message completes "the cache entry FOLDER ..."."""


def _check_zero_or_one(name: str, values: np.ndarray) -> None:
    """Labels and flags are 0 or 1, as decoding checks them (Columns._check_labels): what passes the
    checksums was checked when built, unless the manifest was rewritten to match."""
    what = ZERO_OR_ONE.get(name)
    if what is None:
        return
    if values.dtype == np.bool_:  # downcast flags: a byte other than 0 or 1 would still read as True
        values = values.view(np.uint8)
    if not ((values == 0) | (values == 1)).all():
        raise BadEntry(f"holds a {what} other than 0 or 1 in column {name}")


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
) -> str:
    """Decodes and preprocesses the file at `path` into an entry at `final`, written in `temporary` first;
    where the entry is. Damage raises DataError, or with ignore_data_errors is written into the entry. A
    full disk is a UserError. Another process that built the same entry first wins. Where something not
    ours holds `final` (a link, a file, a folder), it is left alone and the entry stays in `temporary`."""
    damage = _CollectedDamage() if data.ignore_data_errors else None
    preprocessors = [p for p in build_preprocessors(data.preprocess, labels=labels) if _row_by_row(p)]
    keep_stored_labels = labels and _needs_stored_labels(data)
    source = file_format(data, [path])
    columns = Columns(data, preprocessors, labels, damage, source)
    folder = Path(temporary)
    try:
        folder.mkdir()  # neither follows a link nor takes a folder that is there
    except OSError as e:
        raise _cannot_write(path, folder, e) from None
    try:
        mark(folder)
        with _ColumnWriter(folder) as writer:
            records = _records(source.read(path, columns.wanted_specs), path, damage)
            first = 0
            while chunk := list(islice(records, CHUNK)):
                if stopped():
                    raise _Stopped
                items = [(record, path, first + i) for i, record in enumerate(chunk)]
                first += len(chunk)
                writer.append(_decode(columns, preprocessors, items, keep_stored_labels), len(chunk))
            writer.finish(path, damage.summary if damage else None, columns.defaults_filled())
        return _move_into_place(folder, Path(final))
    except OSError as e:
        _remove(folder)
        raise _cannot_write(path, folder, e) from None
    except BaseException:
        _remove(folder)
        raise


def _cannot_write(path: str, folder: Path, e: OSError) -> UserError:
    return UserError(f"cache: cannot write {path}'s entry in {folder.parent}: {describe_os_error(e)}")


def _move_into_place(folder: Path, final: Path) -> str:
    """Where the entry built in `folder` is: `final`, or `folder` while something not ours holds `final`."""
    if state(final) == "absent":
        try:
            folder.rename(final)  # onto an empty folder made meanwhile too: not worth a renameat2 call
            return str(final)
        except OSError:
            pass
    if state(final) == "foreign":
        return str(folder)
    _remove(folder)  # built by another process meanwhile: theirs is the same
    return str(final)


def _remove(folder: Path) -> None:
    """Removes a folder this process made (never a link: rmtree refuses those)."""
    shutil.rmtree(folder, ignore_errors=True)


def _row_by_row(preprocessor: Preprocessor) -> bool:
    return not isinstance(preprocessor, NegativeDownsampler)


def _needs_stored_labels(data: DataConfig) -> bool:
    return bool(data.preprocess and data.preprocess.downsample_negatives and data.preprocess.rectify_labels)


def _records(records: Iterator, path: str, damage: Damage | None) -> Iterator:
    try:
        yield from records
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
    """Appends rows, chunk by chunk, to one raw file per column, and their checksums; a damaged record's row
    is zeros. Not ndarray.tofile: its error on a full disk has no errno ("8192 requested and 0 written")."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, tuple] = {}  # name -> (open file, dtype, shape of one row)
        self.checksums: Counter[BinaryIO] = Counter()  # open file -> crc32 so far
        self.valid = create(folder / "valid.bin")
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
                    file = create(self.folder / _column_file(len(self.files)))
                    self.files[name] = (file, values.dtype, values.shape[1:])
                    self._write(file, np.zeros((self.records, *values.shape[1:]), values.dtype))
                file, dtype, shape = self.files[name]
                full = values if len(kept) == n else np.zeros((n, *shape), dtype)
                full[kept] = values
                self._write(file, np.ascontiguousarray(full, dtype=dtype))
        for name, (file, dtype, shape) in self.files.items():
            if decoded is None or name not in decoded[0]:
                self._write(file, np.zeros((n, *shape), dtype))
        self._write(self.valid, valid)
        self.records += n

    def _write(self, file: BinaryIO, values: np.ndarray) -> None:
        raw = values.reshape(-1).view(np.uint8)  # any dtype (bfloat16 exports no buffer of its own)
        file.write(raw)  # buffered: all of it, or an OSError with its errno
        self.checksums[file] = checksum(raw, self.checksums[file])

    def finish(self, path: str, damage: dict | None, defaults_filled: Counter[str]) -> None:
        columns = [
            {
                "name": name,
                "file": _column_file(i),
                "dtype": dtype.str,
                "shape": list(shape),
                "crc32": self.checksums[file],
            }
            for i, (name, (file, dtype, shape)) in enumerate(self.files.items())
        ]
        manifest = {
            "format": FORMAT,
            "source": path,
            "records": self.records,
            "columns": columns,
            "valid_crc32": self.checksums[self.valid],
            "damage": damage or {"file": None, "records": 0, "messages": []},
            "defaults_filled": dict(defaults_filled),
        }
        for file in [self.valid, *(file for file, _, _ in self.files.values())]:
            file.flush()  # a full disk raises here, before the manifest says the entry is whole
        with create(self.folder / MANIFEST) as f:
            f.write(json.dumps(manifest, indent=1).encode())


def _column_file(index: int) -> str:
    return f"column-{index}.bin"


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
    # Per entry: the batch rows it fills and its records there (integer positions: a boolean mask costs
    # more per column than it saves).
    parts = [(np.flatnonzero(which == key), entry) for key, entry in entries.items()]
    parts = [(rows, index[rows], entry) for rows, entry in parts if len(rows)]
    out = {}
    for name, sample in parts[0][2].columns.items():
        values = out[name] = np.empty((len(index), *sample.shape[1:]), dtype=sample.dtype)
        for rows, records, entry in parts:
            values[rows] = entry.columns[name][records]
    features = {name.removeprefix("features/"): v for name, v in out.items() if name.startswith("features/")}
    if STORED_LABELS in out:  # downsample_negatives goes by the stored labels
        return Rows(features, out[STORED_LABELS], out["weights"], tasks, {FINAL_LABELS: out["labels"]})
    return Rows(features, out["labels"], out["weights"], tasks)


def with_final_labels(rows: Rows) -> Rows:
    """Rows from gather, after downsample_negatives: the rectified labels back in place."""
    if FINAL_LABELS in rows.extras:
        rows.labels = rows.extras.pop(FINAL_LABELS)
    return rows
