"""The Recap dataset: TFRecord files of tf.Examples in, Batches of torch tensors out.

order.py     which records make each batch, in which order: files, interleave, shuffle, epochs
pipeline.py  the threads that read and decode ahead of the consumer, keeping that order
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..config.data import DataConfig
from ..errors import DataError
from ..schema import load_schema
from .batch import Batch
from .example import ExampleDecoder
from .files import shard_files
from .order import BLOCK, Item, Order
from .pipeline import READ_AHEAD, FileReader, OrderedMap
from .preprocess import Examples, preprocess

log = logging.getLogger(__name__)


class RecapDataset:
    """An iterable of Batch (see batch.py) over the files of one data config, for one rank.

    training=True: files reshuffled every epoch from (seed, rank), file_batch_size files interleaved in
    blocks of 4 records, a shuffle buffer of examples_shuffle_buffer_size records, repeated forever, every
    batch full. training=False: one pass over the sorted files (still interleaved file_batch_size at a time,
    without any shuffle; file_batch_size: 1 reads file after file), and the last, partial batch is kept.
    `cache: true` keeps the batches of the first complete pass in memory and serves later passes from there;
    it applies to training=False only (a training stream never ends and keeps reshuffling).

    Each rank reads its own files, files[rank::world_size] of the sorted list, with a batch of
    global_batch_size / world_size; errors about that name the config section `where`. `inputs`
    replaces the config's file selection with a glob.
    require_labels=False (prediction) reads no label: Batch.tasks is () and labels and weights are
    [B, 0]; the preprocessors that need labels (downsample_negatives, rectify_labels) are skipped."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        training: bool = True,
        inputs: str | None = None,
        require_labels: bool = True,
        where: str = "data",
    ):
        if inputs is not None:
            data = data.model_copy(
                update={"inputs": inputs, "explicit_date_inputs": None, "explicit_datetime_inputs": None}
            )
        self.files, self.batch_size = shard_files(data, rank, world_size, where)
        self.data = data
        self.training = training
        self.require_labels = require_labels
        downsample = data.preprocess and data.preprocess.downsample_negatives
        self.records_per_batch = self.batch_size * (
            downsample.batch_multiplier if downsample and require_labels else 1
        )
        self.damaged_files: list[str] = []  # files skipped past a damaged record (ignore_data_errors)
        downsample = data.preprocess and data.preprocess.downsample_negatives
        self._order = Order(
            self.files,
            data.file_batch_size,
            data.examples_shuffle_buffer_size,
            run_size=self.batch_size * (downsample.batch_multiplier if downsample and require_labels else 1),
            seed=(seed & 0xFFFF_FFFF_FFFF_FFFF, rank),
            shuffle=training,
            repeat=training,
            drop_last=training,
        )
        self._columns = _Columns(data, require_labels)
        self._decoders = threading.local()
        self._chunk = max(BLOCK, READ_AHEAD // min(data.file_batch_size, len(self.files)))
        self._start = 0
        self._cached: list[Batch] | None = None
        self._maps: set[OrderedMap] = set()
        if data.cache and training:
            log.info("cache: true has no effect on a training stream (it never ends and keeps reshuffling)")
        log.info(
            "%s, %s: %d files for rank %d of %d, batches of %d examples",
            where,
            "training" if training else "evaluation",
            len(self.files),
            rank,
            world_size,
            self.batch_size,
        )

    def skip_to(self, batches_consumed: int) -> None:
        """The next iteration starts after `batches_consumed` batches, exactly where an uninterrupted one
        would be. The skipped records are read again (inflated, checksummed, shuffled) to rebuild the order,
        but not decoded: this costs about the reading time of the skipped examples."""
        self._start = batches_consumed

    def __iter__(self) -> Iterator[Batch]:
        start, self._start = self._start, 0
        if self._cached is not None:
            yield from self._cached[start:]
            return
        cache = [] if self.data.cache and not self.training and start == 0 else None
        # Default threads: reading (inflate + CRC) is ~85% of the work and decoding ~10%, so every CPU
        # reads and a quarter of them decode.
        cpus = len(os.sched_getaffinity(0))
        batches = OrderedMap(
            self._runs,
            self._make_batch,
            skip=start,
            read_workers=self.data.interleave_num_parallel_calls or cpus,
            map_workers=self.data.map_num_parallel_calls or max(1, cpus // 4),
        )
        self._maps.add(batches)
        try:
            for batch in batches:
                if cache is not None:
                    cache.append(batch)
                yield batch
            if cache is not None:
                self._cached = cache
        finally:
            batches.close()
            self._maps.discard(batches)

    def close(self) -> None:
        """Stops the threads of every iteration still open."""
        for batches in list(self._maps):
            batches.close()

    def _runs(self, pool: ThreadPoolExecutor) -> Iterator[list[Item]]:
        return self._order.runs(lambda path: self._open(path, pool))

    def _open(self, path: str, pool: ThreadPoolExecutor) -> Iterator[Item]:
        # The reader starts reading now, so that every file of a group is being read before it is needed.
        reader = FileReader(path, pool, self._chunk, self.data.ignore_data_errors, self.damaged_files)
        return ((record, path, index) for index, record in enumerate(reader))

    # --- the batches (decoder threads) ---

    def _make_batch(self, items: list[Item]) -> Batch:
        ex = self._columns.examples(self._decode(items))
        ex = preprocess(ex, self.data.preprocess, with_labels=self.require_labels)
        return self._columns.batch(ex)

    def _decode(self, items: list[Item]) -> dict[str, np.ndarray]:
        decoder = getattr(self._decoders, "decoder", None)
        if decoder is None:  # one per thread: a decoder counts the absent features it meets
            decoder = self._decoders.decoder = ExampleDecoder(self._columns.specs, self._columns.wanted)
        try:
            return decoder.decode_batch([record for record, _, _ in items], file="(a batch)")
        except DataError:
            # Name the file and record: decode them one by one until the bad one raises.
            for record, path, index in items:
                decoder.decode_batch([record], file=path, first_index=index)
            raise


class _Columns:
    """What to decode for a data config, and how decoded columns become Examples and then a Batch. The
    schema facts it relies on (every name is in the schema, a label is one value, no feature is a
    bytes_list, mantissa masks name float features read) are config-time checks: config/root.py."""

    def __init__(self, data: DataConfig, require_labels: bool):
        self.specs = load_schema(data.seg_dense_schema.schema_path)
        schema = data.seg_dense_schema
        # Output name -> schema name: renamed features, then features read under their own names.
        self.features = {**schema.renamed_features, **{name: name for name in schema.features}}
        self.tasks = tuple(data.tasks) if require_labels else ()
        self.pos_rates = np.array([data.tasks[t].pos_downsampling_rate for t in self.tasks], dtype=np.float32)
        self.neg_rates = np.array([data.tasks[t].neg_downsampling_rate for t in self.tasks], dtype=np.float32)
        self.extras = self._rectify_fields(data) if require_labels else {}
        self.wanted = list(dict.fromkeys([*self.features.values(), *self.tasks, *self.extras.values()]))
        self.mantissa_masks = {
            name: np.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)
            for name, bits in schema.mask_mantissa_features.items()
        }
        downcast = data.preprocess and data.preprocess.downcast
        self.bfloat16 = [name for name, t in downcast.features.items() if t == "bfloat16"] if downcast else []

    def _rectify_fields(self, data: DataConfig) -> dict[str, str]:
        """The timestamps rectify_labels needs that are not features already: field -> schema name. A field
        names a renamed feature or a schema feature (read under its own name)."""
        rectify = data.preprocess and data.preprocess.rectify_labels
        if not rectify:
            return {}
        fields = [
            rectify.served_timestamp_field,
            rectify.impressed_timestamp_field,
            *rectify.label_to_engaged_timestamp_field.values(),
        ]
        return {name: name for name in fields if name not in self.features}

    def examples(self, columns: dict[str, np.ndarray]) -> Examples:
        features = {out: _squeeze(columns[source]) for out, source in self.features.items()}
        if "binary" in features:  # flags arrive as int64; the model takes them as float32 (or downcast)
            features["binary"] = features["binary"].astype(np.float32)
        for name, mask in self.mantissa_masks.items():
            features[name].view(np.uint32)[...] &= mask
        if self.tasks:
            labels = (np.concatenate([columns[t] for t in self.tasks], axis=1) > 0).astype(np.float32)
        else:
            labels = np.zeros((len(next(iter(columns.values()))), 0), dtype=np.float32)
        # Inverse sampling probability of the stored label; computed before rectify_labels on purpose.
        weights = labels / self.pos_rates + (1 - labels) / self.neg_rates
        extras = {name: _squeeze(columns[source]) for name, source in self.extras.items()}
        return Examples(features, labels, weights, self.tasks, extras)

    def batch(self, ex: Examples) -> Batch:
        features = {
            name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in ex.features.items()
        }
        for name in self.bfloat16:  # exact: preprocess.downcast rounded the values to bfloat16 already
            features[name] = features[name].to(torch.bfloat16)
        return Batch(
            features,
            torch.from_numpy(np.ascontiguousarray(ex.labels)),
            torch.from_numpy(np.ascontiguousarray(ex.weights, dtype=np.float32)),
            ex.tasks,
        )


def _squeeze(values: np.ndarray) -> np.ndarray:
    """Length-1 features are one value per example: [N]."""
    return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values


def _squeeze(values: np.ndarray) -> np.ndarray:
    """Length-1 features are one value per example: [N]."""
    return values[:, 0] if values.ndim == 2 and values.shape[1] == 1 else values
