"""One data file in the decoded cache (data/cache.py): its layout on disk, its key, how it is built and how
batches are gathered from entries.

An entry is a folder: a raw array file per column (rows in record order, a damaged record's row zeros),
valid.bin (whether each record decoded) and manifest.json (the columns' dtypes and shapes, the records read,
the damage met, the schema defaults filled), written last. Columns are features/NAME after the deterministic
preprocessing, labels (rectified), weights and, when downsample_negatives and rectify_labels are both
configured, the labels as stored, which downsampling goes by."""

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

import numpy as np

from ..config.data import DataConfig
from ..errors import DataError, UserError
from .batch import Rows
from .columns import Columns
from .damage import Damage
from .preprocess import NegativeDownsampler, Preprocessor, build_preprocessors
from .sources import file_format
from .storage import file_version, is_url

FORMAT = 1  # bumped when what an entry holds, or how it is computed, changes
CHUNK = 4096  # records decoded at a time while building an entry
TEMPORARY = ".building-"  # prefix of the folders entries are written in
STORED_LABELS = "stored_labels"  # the labels as stored, for downsample_negatives after rectify_labels
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
                # numpy cannot map an empty file (no records, or labels [N, 0] when reading none). A plain
                # ndarray view: memmap's Python __getitem__ took a third of gather's time.
                mapped = np.memmap(file, dtype, "r", shape=shape).view(np.ndarray) if size else None
                columns[column["name"]] = np.empty(shape, dtype) if mapped is None else mapped
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
    source = file_format(data, [path])
    columns = Columns(data, preprocessors, labels, damage, source)
    folder = Path(temporary)
    folder.mkdir()
    try:
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
