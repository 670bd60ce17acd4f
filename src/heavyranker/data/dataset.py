"""The Recap dataset: TFRecord files of tf.Examples in, Batches of torch tensors out.

One producer thread decides the order of everything, so that the batches depend on the seed and the files
only, never on thread timing:

  files (this rank's share; shuffled per epoch when training)
  -> groups of file_batch_size files, their records interleaved in blocks of 4
     (reader threads inflate and checksum each file a chunk of records ahead of the interleave)
  -> shuffle buffer of examples_shuffle_buffer_size records (training only)
  -> runs of batch-size records (times downsample_negatives.batch_multiplier)
  -> decoder threads: decode the run at once, preprocess, torch tensors -> Batch, delivered in order.

Threads, not processes: inflate (isal), CRC32C and most of numpy release the GIL, and threads hand records
and arrays over without copying or pickling them. The queue between producer and consumer holds at most
`decoder threads + PREFETCH` batches and the readers of a group about 2 * READ_AHEAD records, so memory
stays flat whatever the dataset's size.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count, islice

import numpy as np
import torch

from ..config.data import DataConfig
from ..errors import DataError, UserError
from ..schema import load_schema
from .batch import Batch
from .files import select_files
from .preprocess import Examples, preprocess
from .tf_example import ExampleDecoder
from .tfrecord import read_records

log = logging.getLogger(__name__)

BLOCK = 4  # records taken from one file before the interleave moves to the next
READ_AHEAD = 1024  # records read ahead for a group of files, in chunks of READ_AHEAD / files
PREFETCH = 2  # batches decoded ahead of the consumer, beyond one per decoder thread

Item = tuple[bytes, str, int]  # a record, its file and its index in that file


class RecapDataset:
    """An iterable of Batch (see batch.py) over the files of one data config, for one rank.

    training=True: files reshuffled every epoch from (seed, rank), file_batch_size files interleaved in
    blocks of 4 records, a shuffle buffer of examples_shuffle_buffer_size records, repeated forever, every
    batch full. training=False: one pass over the sorted files (still interleaved file_batch_size at a time,
    without any shuffle; file_batch_size: 1 reads file after file), and the last, partial batch is kept.
    `cache: true` keeps the batches of the first complete pass in memory and serves later passes from there;
    it applies to training=False only (a training stream never ends and keeps reshuffling).

    Each rank reads its own files, files[rank::world_size] of the sorted list, with a batch of
    global_batch_size / world_size. `inputs` replaces the config's file selection with a glob.
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
    ):
        if data.global_batch_size % world_size:
            raise UserError(
                f"global_batch_size {data.global_batch_size} is not divisible by the "
                f"{world_size} processes (world size)"
            )
        if inputs is not None:
            data = data.model_copy(
                update={"inputs": inputs, "explicit_date_inputs": None, "explicit_datetime_inputs": None}
            )
        files = select_files(data)
        if len(files) < world_size:
            raise UserError(
                f"{len(files)} data file(s) for {world_size} processes: each process reads its own "
                f"files, so split the data into at least {world_size} files"
            )
        self.data = data
        self.files = files[rank::world_size]
        self.training = training
        self.require_labels = require_labels
        self.batch_size = data.global_batch_size // world_size
        downsample = data.preprocess and data.preprocess.downsample_negatives
        self.records_per_batch = self.batch_size * (
            downsample.batch_multiplier if downsample and require_labels else 1
        )
        self.damaged_files: list[str] = []  # files skipped past a damaged record (ignore_data_errors)
        self._seed = (seed & 0xFFFF_FFFF_FFFF_FFFF, rank)  # SeedSequence takes non-negative integers
        self._columns = _Columns(data, require_labels)
        self._decoders = threading.local()
        self._start = 0
        self._cached: list[Batch] | None = None
        self._runs: set[_Run] = set()
        if data.cache and training:
            log.info("cache: true has no effect on a training stream (it never ends and keeps reshuffling)")
        log.info(
            "%s data: %d of %d files for rank %d of %d, batches of %d examples",
            "training" if training else "evaluation",
            len(self.files),
            len(files),
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
        run = _Run(
            self._record_runs,
            self._make_batch,
            skip=start,
            read_workers=self.data.interleave_num_parallel_calls or cpus,
            map_workers=self.data.map_num_parallel_calls or max(1, cpus // 4),
        )
        self._runs.add(run)
        try:
            for batch in run:
                if cache is not None:
                    cache.append(batch)
                yield batch
            if cache is not None:
                self._cached = cache
        finally:
            run.close()
            self._runs.discard(run)

    def close(self) -> None:
        """Stops the threads of every iteration still open."""
        for run in list(self._runs):
            run.close()

    # --- the order (producer thread) ---

    def _record_runs(self, pool: ThreadPoolExecutor) -> Iterator[list[Item]]:
        records = self._records(pool)
        if self.training and self.data.examples_shuffle_buffer_size > 1:
            rng = np.random.default_rng([*self._seed, 1])
            records = shuffle(records, self.data.examples_shuffle_buffer_size, rng)
        n = self.records_per_batch
        while run := list(islice(records, n)):
            if len(run) < n and self.training:
                return
            yield run

    def _records(self, pool: ThreadPoolExecutor) -> Iterator[Item]:
        for epoch in count() if self.training else range(1):
            files = self.files
            if self.training:
                files = [
                    files[i] for i in np.random.default_rng([*self._seed, 0, epoch]).permutation(len(files))
                ]
            empty = True
            for first in range(0, len(files), self.data.file_batch_size):
                group = files[first : first + self.data.file_batch_size]
                for item in interleave([self._file_records(path, pool) for path in group], BLOCK):
                    empty = False
                    yield item
            if empty:
                raise DataError(
                    f"no records could be read from any of the {len(files)} files "
                    f"({files[0]}, ...); {len(self.damaged_files)} were damaged"
                )

    def _file_records(self, path: str, pool: ThreadPoolExecutor) -> Iterator[Item]:
        # The reader starts reading now, so that every file of a group is being read before it is needed.
        chunk = max(BLOCK, READ_AHEAD // min(self.data.file_batch_size, len(self.files)))
        reader = _FileReader(path, pool, chunk, self.data.ignore_data_errors, self.damaged_files)
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
    """What to decode for a data config, and how decoded columns become Examples and then a Batch."""

    def __init__(self, data: DataConfig, require_labels: bool):
        self.specs = load_schema(data.seg_dense_schema.schema_path)
        schema = data.seg_dense_schema
        # Output name -> schema name: renamed features, then features read under their own names.
        self.features = {**schema.renamed_features, **{name: name for name in schema.features}}
        self.tasks = tuple(data.tasks) if require_labels else ()
        for task in self.tasks:
            if task not in self.specs:
                raise UserError(f"label {task}: no feature of that name in the schema {schema.schema_path}")
            if self.specs[task].length != 1:
                raise UserError(
                    f"label {task}: the schema gives it {self.specs[task].length} values; a label "
                    f"is one value per example"
                )
        self.pos_rates = np.array([data.tasks[t].pos_downsampling_rate for t in self.tasks], dtype=np.float32)
        self.neg_rates = np.array([data.tasks[t].neg_downsampling_rate for t in self.tasks], dtype=np.float32)
        for out, source in self.features.items():
            if source not in self.specs:
                raise UserError(f"feature {out}: {source} is not in the schema {schema.schema_path}")
            if self.specs[source].dtype == "bytes_list":
                raise UserError(
                    f"feature {out} ({source}) is a bytes_list, which a batch of tensors cannot hold"
                )
        self.extras = self._rectify_fields(data) if require_labels else {}
        self.wanted = list(dict.fromkeys([*self.features.values(), *self.tasks, *self.extras.values()]))
        self.mantissa_masks = {
            name: self._mantissa_mask(name, bits) for name, bits in schema.mask_mantissa_features.items()
        }
        downcast = data.preprocess and data.preprocess.downcast
        self.bfloat16 = [name for name, t in downcast.features.items() if t == "bfloat16"] if downcast else []

    def _rectify_fields(self, data: DataConfig) -> dict[str, str]:
        """The timestamps rectify_labels needs that are not features already: field -> schema name. A field
        names a renamed feature or a schema feature."""
        rectify = data.preprocess and data.preprocess.rectify_labels
        if not rectify:
            return {}
        fields = [
            rectify.served_timestamp_field,
            rectify.impressed_timestamp_field,
            *rectify.label_to_engaged_timestamp_field.values(),
        ]
        extras = {}
        for name in fields:
            source = data.seg_dense_schema.renamed_features.get(name, name)
            if source not in self.specs:
                raise UserError(
                    f"preprocess.rectify_labels: the timestamp {name} is neither a renamed feature "
                    f"nor in the schema {data.seg_dense_schema.schema_path}"
                )
            if name not in self.features:
                extras[name] = source
        return extras

    def _mantissa_mask(self, name: str, bits: int) -> np.uint32:
        where = f"seg_dense_schema.mask_mantissa_features.{name}"
        if name not in self.features:
            raise UserError(
                f"{where}: not a feature read by this config (features: {', '.join(self.features)})"
            )
        if self.specs[self.features[name]].dtype != "float_list":
            raise UserError(f"{where}: only float features have a mantissa")
        return np.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)

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


class _FileReader:
    """A file's records, read `chunk` at a time by a reader thread, one chunk ahead of the consumer."""

    def __init__(
        self, path: str, pool: ThreadPoolExecutor, chunk: int, ignore_errors: bool, damaged: list[str]
    ):
        self.path = path
        self._records = read_records(path)
        self._pool = pool
        self._chunk = chunk
        self._ignore_errors = ignore_errors
        self._damaged = damaged
        self._next = pool.submit(self._read_chunk)

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self._next.result():
            self._next = self._pool.submit(self._read_chunk)
            yield from chunk

    def _read_chunk(self) -> list[bytes]:
        chunk: list[bytes] = []
        try:
            for record in self._records:
                chunk.append(record)
                if len(chunk) == self._chunk:
                    break
        except DataError as e:
            if not self._ignore_errors:
                raise
            self._damaged.append(self.path)
            log.warning(
                "%s; ignore_data_errors: skipped the rest of the file (%d damaged files so far)",
                e,
                len(self._damaged),
            )
        return chunk


def interleave(streams: Iterable[Iterator[Item]], block: int) -> Iterator[Item]:
    """`block` items from each stream in turn, dropping streams as they end, until all have ended."""
    streams = list(streams)
    while streams:
        alive = []
        for stream in streams:
            taken = list(islice(stream, block))
            yield from taken
            if len(taken) == block:
                alive.append(stream)
        streams = alive


def shuffle(items: Iterator[Item], size: int, rng: np.random.Generator) -> Iterator[Item]:
    """tf.data's shuffle: fill a buffer of `size`, then for each new item emit a random buffered one and put
    the new one in its place; at the end emit the rest in random order."""
    buffer: list[Item] = list(islice(items, size))
    draws: Iterator[int] = iter(())
    for item in items:
        i = next(draws, None)
        if i is None:  # drawing in blocks: one numpy call per 4096 items, not one per item
            draws = iter(rng.integers(0, size, 4096).tolist())
            i = next(draws)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _yield_to_the_model() -> None:
    """Runs the calling data thread at the lowest priority (Linux: nice is per thread).

    Reading works ahead behind bounded queues, so it can wait; the model's parallel regions cannot: a data
    thread that takes a core from one of torch's threads stalls the whole matmul until it yields. At nice 19
    the scheduler runs data threads mostly when torch's threads are idle, and still fully when the model
    waits for data."""
    # Elsewhere a native thread id is not a pid, and setpriority could renice another process.
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not allowed: run at the process's priority
        pass


class _Run:
    """One iteration: a producer thread turns record runs into Batch futures on the decoder pool, in order,
    through a bounded queue; iterating yields the batches in that order."""

    _END = object()

    def __init__(
        self,
        record_runs: Callable[[ThreadPoolExecutor], Iterator[list[Item]]],
        make_batch: Callable[[list[Item]], Batch],
        *,
        skip: int,
        read_workers: int,
        map_workers: int,
    ):
        self._read_pool = ThreadPoolExecutor(
            read_workers, thread_name_prefix="heavyranker-read", initializer=_yield_to_the_model
        )
        self._map_pool = ThreadPoolExecutor(
            map_workers, thread_name_prefix="heavyranker-decode", initializer=_yield_to_the_model
        )
        self._queue: queue.Queue = queue.Queue(map_workers + PREFETCH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(record_runs, make_batch, skip), name="heavyranker-order", daemon=True
        )
        self._thread.start()

    def _produce(
        self,
        record_runs: Callable[[ThreadPoolExecutor], Iterator[list[Item]]],
        make_batch: Callable[[list[Item]], Batch],
        skip: int,
    ) -> None:
        _yield_to_the_model()
        try:
            for run in islice(record_runs(self._read_pool), skip, None):
                if not self._put(self._map_pool.submit(make_batch, run)):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Batch]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item.result()

    def close(self) -> None:
        """Stops the threads; returns once the producer has ended (within a chunk's read)."""
        self._stop.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Future):
                item.cancel()
        self._map_pool.shutdown(wait=False, cancel_futures=True)
        self._read_pool.shutdown(wait=False, cancel_futures=True)
        # The producer is a daemon thread (an iteration nobody closes must not hold the process at exit),
        # so it has to be gone before the interpreter finalizes: a daemon thread that frees a batch's
        # tensors then aborts the process (torch releases the GIL to free them, and re-taking it during
        # finalization ends the thread through C++ frames: "terminate called without an active exception").
        self._thread.join()
