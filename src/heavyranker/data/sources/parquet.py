"""Parquet files, read with pyarrow one row group at a time, in slices of ROWS_PER_READ rows, so that memory
follows the shuffle buffer and the batch, not the file's size.

Columns map to schema features by name; only the wanted ones are read. A feature of length L is a list
column whose every row holds L values, a fixed-size list column of size L, or (L = 1) a scalar column. The
values are floating point for a float_list feature (stored as float32, as a tf.Example holds them), integer
or boolean for an int64_list feature (int64), binary or string for a bytes_list one. A missing column, another
type, another length or a null is damage: a DataError naming the file, row group and column (with
ignore_data_errors the rest of the file is skipped and counted, as for a damaged TFRecord file).

A record is a row: (the slice's columns as [rows, L] arrays, the row's index in the slice). RowDecoder
gathers the rows of a batch from those arrays, so a row is copied once, into its batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ...errors import DataError, UserError
from ...schema import FeatureSpec
from ..storage import is_url, local, open_binary

# Rows converted at a time. A slice's arrays live while any of its rows waits in the shuffle buffer (of b
# rows): about b * ln(ROWS_PER_READ) rows in all, 5.5 b here, whatever the file's size.
ROWS_PER_READ = 256
READ_BUFFER = 1 << 20  # bytes of a column chunk read at a time: memory follows pages, not row groups
_NUMPY = {"float_list": np.float32, "int64_list": np.int64, "bytes_list": object}
_KINDS = {  # what a feature's values may be stored as, and how that is said in an error
    "float_list": (pa.types.is_floating, "floating point"),
    "int64_list": (lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t), "integer"),
    "bytes_list": (
        lambda t: (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
        ),
        "binary or string",
    ),
}

Row = tuple[dict[str, np.ndarray], int]


class _Damage(Exception):
    """Why the file cannot be read past this point; read_rows adds the file and the row group."""


def read_rows(path: str, specs: Mapping[str, FeatureSpec]) -> Iterator[Row]:
    """The rows of the Parquet file at `path` (a local path or an fsspec URL), their `specs` columns
    decoded; damage raises DataError after the rows before it were yielded."""
    group, rows = 0, 0
    try:
        with _open(path) as parquet:
            _check_columns(parquet.schema_arrow, specs)
            for group in range(parquet.num_row_groups):
                slices = parquet.iter_batches(
                    ROWS_PER_READ, row_groups=[group], columns=list(specs), use_threads=False
                )
                for piece in slices:
                    columns = {name: _values(piece.column(name), spec, rows) for name, spec in specs.items()}
                    for row in range(piece.num_rows):
                        yield columns, row
                    rows += piece.num_rows
            if rows == 0:
                raise _Damage("the file holds no rows")
    except _Damage as e:
        raise DataError(f"{path}: row group {group}: {e}") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: row group {group}: unreadable ({type(e).__name__}: {e})") from None


def column_names(path: str) -> list[str]:
    """The columns of the Parquet file at `path`, from its footer."""
    try:
        with _open(path) as parquet:
            return parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _open(path: str) -> Iterator[pq.ParquetFile]:
    # A local file is read by pyarrow itself, without the GIL; a URL through the storage layer's file.
    with contextlib.nullcontext(local(path)) if not is_url(path) else open_binary(path) as source:
        with pq.ParquetFile(source, pre_buffer=False, buffer_size=READ_BUFFER) as parquet:
            yield parquet


def _check_columns(schema: pa.Schema, specs: Mapping[str, FeatureSpec]) -> None:
    missing = [name for name in specs if schema.get_field_index(name) < 0]
    if missing:
        raise _Damage(
            f"column {missing[0]}: missing (a schema feature the config reads); the file's columns: "
            f"{', '.join(schema.names[:20])}{' ...' if len(schema.names) > 20 else ''}"
        )


def _values(array: pa.Array, spec: FeatureSpec, first_row: int) -> np.ndarray:
    """The [rows, length] numpy array of one column of a slice; first_row: the slice's first row's index."""
    where = f"column {spec.name}"
    kind = array.type
    if array.null_count:
        row = first_row + int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))
        raise _Damage(f"{where}: row {row} is null")
    if pa.types.is_fixed_size_list(kind):
        if kind.list_size != spec.length:
            raise _Damage(f"{where}: lists of {kind.list_size} values; the schema's length is {spec.length}")
        values = array.flatten()
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(array).to_numpy()
        wrong = np.flatnonzero(lengths != spec.length)
        if wrong.size:
            raise _Damage(
                f"{where}: row {first_row + int(wrong[0])} holds {lengths[wrong[0]]} values; the schema's "
                f"length is {spec.length}"
            )
        values = array.flatten()
    elif spec.length == 1:
        values = array
    else:
        raise _Damage(f"{where}: a column of {kind}, not of lists; the schema's length is {spec.length}")
    accepts, what = _KINDS[spec.dtype]
    if not accepts(values.type):
        raise _Damage(f"{where}: values of type {values.type}; {spec.dtype} needs {what} values")
    if values.null_count:
        raise _Damage(f"{where}: a null value in the rows from {first_row}")
    if spec.dtype == "bytes_list":
        flat = np.array([v.encode() if isinstance(v, str) else v for v in values.to_pylist()], dtype=object)
    else:
        flat = values.to_numpy(zero_copy_only=False).astype(_NUMPY[spec.dtype], copy=False)
    return flat.reshape(len(array), spec.length)


class RowDecoder:
    """Gathers rows read by read_rows into schema name -> [N, length] arrays. Nothing is missing from a row
    (a missing column is damage), so missing_counts stays empty."""

    def __init__(self, specs: Mapping[str, FeatureSpec], wanted: Sequence[str]):
        unknown = [name for name in wanted if name not in specs]
        if unknown:
            raise UserError(f"feature(s) {', '.join(unknown)} not in the schema")
        self.specs = {name: specs[name] for name in dict.fromkeys(wanted)}
        self.missing_counts: dict[str, int] = {}

    def decode_batch(
        self, records: Sequence[Row], *, file: str = "?", first_index: int = 0
    ) -> dict[str, np.ndarray]:
        slices = {id(columns): columns for columns, _ in records}
        which = np.fromiter((id(columns) for columns, _ in records), np.int64, len(records))
        rows = np.fromiter((row for _, row in records), np.int64, len(records))
        out = {
            name: np.empty((len(records), spec.length), _NUMPY[spec.dtype])
            for name, spec in self.specs.items()
        }
        for key, columns in slices.items():
            at = np.flatnonzero(which == key)
            for name, values in out.items():
                values[at] = columns[name][rows[at]]
        return out
