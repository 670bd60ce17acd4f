"""`heavyranker predict`: score data files (TFRecord or Parquet) with an exported model folder.

Writes one row per example: the meta ids the data holds (user_id, tweet_id, author_id), each task's
calibrated probability (a column named after the task) and the score. Batches stream from the files through
the model into the output, one row group (Parquet) or block of lines (CSV) per batch, so memory stays flat
whatever the input size. The file appears under its name only once complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import ValidationError
from tqdm import tqdm

from ..atomic import atomic_path, output_file
from ..config.data import DataConfig
from ..data.batch import Batch
from ..data.dataset import RecapDataset, describe_counts
from ..errors import SettingError, UserError
from .precision import warn_if_slow_here
from .scorer import Scorer

log = logging.getLogger(__name__)

META_PREFIX = "meta__"
META_ORDER = ("meta__user_id", "meta__tweet_id", "meta__author_id")  # then any other meta__ feature
SCORE = "score"


def predict_files(*, model_dir: str, inputs: str, out: str, batch_size: int = 1024) -> int:
    """Scores every record of the files `inputs` (a glob) matches, in file order; returns the row count."""
    writer_class = _writer_class(out)
    # Checked before any scoring: pyarrow's error, after it, named the temporary file.
    output_file(out, "predict: --out")
    scorer = Scorer(model_dir)
    warn_if_slow_here(scorer.precision)
    data = _data_config(scorer, model_dir, batch_size)
    with RecapDataset(data, inputs=inputs, require_labels=False) as dataset, atomic_path(out) as temporary:
        rows = _write(dataset, scorer, writer_class, temporary)
        log.info("%s: %s", inputs, describe_counts(dataset.counts()))
    log.info("wrote %d rows to %s (scored in %s)", rows, out, scorer.precision)
    return rows


def _write(dataset: RecapDataset, scorer: Scorer, writer_class: type, path: Path) -> int:
    writer = None
    rows = 0
    try:
        with tqdm(desc="predict", unit="ex", dynamic_ncols=True) as bar:
            for batch in dataset:
                table = _table(batch, scorer)
                if writer is None:
                    writer = writer_class(str(path), table.schema)
                writer.write_table(table)
                rows += table.num_rows
                bar.update(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _table(batch: Batch, scorer: Scorer) -> pa.Table:
    probabilities, score = scorer(batch.features)
    meta = sorted(
        (name for name in batch.features if name.startswith(META_PREFIX)),
        key=lambda name: (META_ORDER.index(name) if name in META_ORDER else len(META_ORDER), name),
    )
    columns = {name.removeprefix(META_PREFIX): batch.features[name].numpy() for name in meta}
    columns.update({task: probabilities[:, j].numpy() for j, task in enumerate(scorer.tasks)})
    columns[SCORE] = score.numpy()
    return pa.table(columns)


def _writer_class(out: str) -> type:
    suffix = Path(out).suffix.lower()
    if suffix == ".parquet":
        return pq.ParquetWriter
    if suffix == ".csv":
        return pa_csv.CSVWriter
    raise SettingError(
        "out", f"{out}: the extension says the format, .parquet or .csv (got {suffix or 'none'})"
    )


def _data_config(scorer: Scorer, model_dir: str, batch_size: int) -> DataConfig:
    """The training data's reader settings (preprocess included: the model saw its output), reading with
    the schema copied into the model folder, batch_size examples at a time."""
    try:
        data = dict(scorer.manifest["config"]["train_data"])
        data["seg_dense_schema"] = {
            **data["seg_dense_schema"],
            "schema_path": str(Path(model_dir) / scorer.manifest["schema"]),
        }
    except (KeyError, TypeError, ValueError) as e:  # a manifest edited by hand or cut short
        raise UserError(
            f"{Path(model_dir) / 'manifest.json'}: no config.train_data and schema to read the data with "
            f"({type(e).__name__}: {e}): export the model again"
        ) from None
    data["global_batch_size"] = batch_size
    try:
        return DataConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(
            f"{Path(model_dir) / 'manifest.json'}: config.train_data (with batch_size "
            f"{batch_size}): {problems}"
        ) from None
