"""Where records come from. files.py chooses the files a data config reads; a module per kind of file reads
one file's records, in order: tfrecord.py (serialized tf.Examples) and parquet.py (rows of a table). The
dataset, the decoded cache and the preprocessors see a kind only through its Format:

  read(path, specs)       the file's records, in order, read as they are drawn; damage raises DataError
                          naming the file and where in it
  decoder(specs, wanted)  one per thread: decode_batch(records) -> schema name -> [N, length] arrays

A record's position is (file, index of the record in that file, from 0, damaged records counted), whatever
the kind: the dataset's items carry it (order.Item), and the decoded cache and the error messages name
records by it; so can a checkpoint of where a followed source stands."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ...config.data import DataConfig
from ...errors import UserError
from ...schema import FeatureSpec
from ..tf_example import ExampleDecoder
from .parquet import RowDecoder, read_rows
from .tfrecord import read_records


class Decoder(Protocol):
    missing_counts: dict[str, int]  # schema name -> records that lacked it and took the default

    def decode_batch(
        self, records: Sequence[Any], *, file: str = "?", first_index: int = 0
    ) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str  # the file names detected as this format, and listed in dated folders
    read: Callable[[str, Mapping[str, FeatureSpec]], Iterator[Any]]
    decoder: Callable[[Mapping[str, FeatureSpec], Sequence[str]], Decoder]


TFRECORD = Format("tfrecord", ".gz", lambda path, specs: read_records(path), ExampleDecoder)
PARQUET = Format("parquet", ".parquet", read_rows, RowDecoder)
FORMATS = {kind.name: kind for kind in (TFRECORD, PARQUET)}


def file_format(data: DataConfig, files: Sequence[str]) -> Format:
    """`data.format`, or else the format the file names say: Parquet when they end in .parquet, TFRecord
    otherwise (a glob chooses its files, so a TFRecord file may have any name). Files of both kinds are a
    UserError naming one of each."""
    if data.format is not None:
        return FORMATS[data.format]
    parquet = [path for path in files if path.lower().endswith(PARQUET.suffix)]
    if not parquet:
        return TFRECORD
    other = next((path for path in files if not path.lower().endswith(PARQUET.suffix)), None)
    if other is not None:
        raise UserError(
            f"the data files are of two formats: {parquet[0]} is Parquet and {other} is not; read one "
            f"format per data config (format: parquet or format: tfrecord reads every file as that format)"
        )
    return PARQUET
