"""`heavyranker data convert`: a split's files rewritten in the other format, TFRecord <-> Parquet, one output
file per input file, each written atomically, streaming (a chunk of records at a time).

Every schema feature is written, as the schema types it: TFRecord -> Parquet decodes the records (a feature
absent from a record takes the schema default, as training would read it; features outside the schema are
left out) into a column per feature: a fixed-size list of its length, or a scalar for a length-1 feature.
Parquet -> TFRecord writes the file's schema columns as the features of a gzipped tf.Example per row."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..config.data import DataConfig
from ..errors import UserError
from ..schema import FeatureSpec
from .sources import FORMATS, PARQUET, file_format
from .sources.files import select_files
from .sources.parquet import RowDecoder, column_names, read_rows
from .sources.tfrecord import read_records, write_records
from .storage import is_url
from .tf_example import ExampleDecoder, encode_tf_examples

log = logging.getLogger(__name__)

ROWS_PER_CHUNK = 1024  # records decoded, and rows written (a Parquet row group, ~25 MB of seed rows), at once
_ARROW = {"float_list": pa.float32(), "int64_list": pa.int64(), "bytes_list": pa.binary()}


def convert_files(data: DataConfig, *, to: str, out: str, inputs: str | None = None) -> list[str]:
    """Writes each file of `data` (or of the glob `inputs`) in the format `to` under the folder `out`, at
    its path relative to the folder the files share, its suffix replaced (.gz, .parquet). Returns the paths
    written."""
    if inputs is not None:
        data = data.model_copy(
            update={"inputs": inputs, "explicit_date_inputs": None, "explicit_datetime_inputs": None}
        )
    if is_url(out):
        raise UserError(f"--out {out}: a local folder (the files are written there atomically)")
    files = select_files(data)
    source, target = file_format(data, files), FORMATS[to]
    if source is target:
        raise UserError(f"the files are {source.name} already ({files[0]}, ...); --to names the other format")
    specs = data.seg_dense_schema.specs
    written = []
    for path, destination in _destinations(files, out, target.suffix).items():
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if target is PARQUET:
            rows = _write_parquet(destination, _tfrecord_chunks(path, specs), specs)
        else:
            rows = _write_tfrecord(destination, _parquet_chunks(path, specs))
        log.info("%s -> %s: %d records", path, destination, rows)
        written.append(destination)
    return written


def _destinations(files: list[str], out: str, suffix: str) -> dict[str, str]:
    """Each input's output path. Refused before anything is written: two inputs of one output name
    (part-0.gz and part-0.tfrecord), where the second would replace the first, and an output that is an input
    (format: tfrecord reading x.parquet), which would replace the data it was converted from."""
    sources: dict[str, str] = {}  # destination -> the input written there
    for path, name in zip(files, _relative_names(files), strict=True):
        destination = os.path.join(out, os.path.splitext(name)[0] + suffix)
        # An object key is a name, not a path: "a/../../x.gz" or "a//x.gz" would be written outside --out.
        if not os.path.normpath(destination).startswith(os.path.join(os.path.normpath(out), "")):
            raise UserError(f"{path}: its name below the inputs' folder leads outside --out {out}")
        if destination in sources:
            raise UserError(
                f"{sources[destination]} and {path} would both be written to {destination}; rename one"
            )
        sources[destination] = path
    inputs = {os.path.realpath(path) for path in files if not is_url(path)}
    for destination in sources:
        if os.path.realpath(destination) in inputs:
            raise UserError(f"{destination}: --out would write over this input; name another folder")
    return {path: destination for destination, path in sources.items()}


def _relative_names(files: list[str]) -> list[str]:
    """Each file's path below the deepest folder all of them share (URLs included: no normalizing)."""
    common = os.path.commonprefix([os.path.dirname(path) + "/" for path in files])
    common = common[: common.rfind("/") + 1]
    return [path[len(common) :] for path in files]


def _tfrecord_chunks(path: str, specs: Mapping[str, FeatureSpec]) -> Iterator[dict[str, np.ndarray]]:
    decoder, records, first = ExampleDecoder(specs, specs), read_records(path), 0
    while chunk := list(islice(records, ROWS_PER_CHUNK)):
        yield decoder.decode_batch(chunk, file=path, first_index=first)
        first += len(chunk)


def _parquet_chunks(path: str, specs: Mapping[str, FeatureSpec]) -> Iterator[dict[str, np.ndarray]]:
    present = set(column_names(path))
    wanted = {name: spec for name, spec in specs.items() if name in present}
    decoder, rows = RowDecoder(wanted, wanted), read_rows(path, wanted)
    while chunk := list(islice(rows, ROWS_PER_CHUNK)):
        yield decoder.decode_batch(chunk)


def _write_parquet(
    path: str, chunks: Iterator[dict[str, np.ndarray]], specs: Mapping[str, FeatureSpec]
) -> int:
    schema = pa.schema(
        [
            (name, _ARROW[spec.dtype] if spec.length == 1 else pa.list_(_ARROW[spec.dtype], spec.length))
            for name, spec in specs.items()
        ]
    )
    rows = 0
    with atomic_path(path) as temporary, pq.ParquetWriter(temporary, schema) as writer:
        for columns in chunks:
            arrays = [_arrow(columns[name], specs[name], schema.field(name).type) for name in specs]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            rows += len(arrays[0])
    return rows


def _arrow(values: np.ndarray, spec: FeatureSpec, kind: pa.DataType) -> pa.Array:
    flat = pa.array(values.reshape(-1), _ARROW[spec.dtype])
    return flat if spec.length == 1 else pa.FixedSizeListArray.from_arrays(flat, type=kind)


def _write_tfrecord(path: str, chunks: Iterator[dict[str, np.ndarray]]) -> int:
    rows = 0

    def records() -> Iterator[bytes]:
        nonlocal rows
        for columns in chunks:
            encoded = encode_tf_examples(columns)
            rows += len(encoded)
            yield from encoded

    write_records(path, records(), compress=True)
    return rows
