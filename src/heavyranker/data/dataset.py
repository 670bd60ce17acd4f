"""The Recap dataset: data files (TFRecord files of tf.Examples, Parquet tables) in, Batches of torch
tensors out.

sources/     which files, and each kind's records and decoder; a record's position is (file, index)
order.py     which records make each batch, in which order: files, interleave, shuffle, epochs
pipeline.py  the threads that read and decode ahead of the consumer, keeping that order
columns.py   what is decoded from a record, and how the columns become a Batch
preprocess/  what happens to a batch's arrays in between
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from ..config.data import DataConfig
from ..errors import DataError
from .batch import Batch, Rows
from .cache import DecodedCache
from .cache_entry import gather, with_final_labels
from .columns import Columns
from .damage import Damage
from .order import BLOCK, Item, Order, runs
from .pipeline import READ_AHEAD, FileReader, OrderedMap
from .preprocess import NegativeDownsampler, build_preprocessors
from .sources import file_format
from .sources.files import shard_files
from .sources.follow import (
    FilePosition,
    FollowedFiles,
    check_files_and_topic,
    files_source_name,
    source_name,
    without_days_before,
)
from .sources.kafka import KafkaRecords, Offsets
from .sources.mixed import FilesAndTopic

# A Kafka message's name in an error message (kafka.partition_name), before its record index
_MESSAGE = re.compile(r"(kafka topic \S+ partition \d+): record ")

log = logging.getLogger(__name__)


class RecapDataset:
    """An iterable of Batch over the files of one data config, for one rank. A context manager: leaving
    the `with` block stops the threads of every iteration still open (as close() does).

    How it reads, one flag each (training sets all three; evaluation, prediction and statistics none):
      shuffle    the files reshuffled every epoch from (seed, rank), and a shuffle buffer of
                 examples_shuffle_buffer_size records; without it, the sorted files in order.
      repeat     epoch after epoch, never ending; without it, one pass.
      drop_last  every batch full (less its damaged records, below); without it, the last batch holds what
                 is left.
    Either way file_batch_size files are read at once, their records interleaved in blocks of 4
    (file_batch_size: 1 reads file after file). With `cache: true` each file is decoded once into a cache
    on local disk (data/cache.py) and read from there, in the same order, to the same batches.

    With ignore_data_errors a damaged record is left out of its batch, which is that much shorter, drop_last
    or not: each batch stays the one clean data would give less its damaged records, so a seed still gives
    the same batches and skip_to still positions exactly (topping a batch up would shift every later batch).
    A batch left without any record is a DataError with drop_last (training: its loss needs examples, and
    it resumes by counting batches); otherwise it is left out.

    Each rank reads its own files, files[rank::world_size] of the sorted list, with a batch of
    global_batch_size / world_size; errors about that name the config section `where`. `inputs` replaces
    the config's file selection with a glob. require_labels=False (prediction) reads no label: Batch.tasks
    is () and labels and weights are [B, 0]; the preprocessors that need labels (downsample_negatives,
    rectify_labels) are left out."""

    def __init__(
        self,
        data: DataConfig,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        repeat: bool = False,
        drop_last: bool = False,
        inputs: str | None = None,
        require_labels: bool = True,
        where: str = "data",
        follow: bool = False,
    ):
        if inputs is not None:
            data = data.model_copy(
                update={
                    "inputs": inputs,
                    "explicit_date_inputs": None,
                    "explicit_datetime_inputs": None,
                    "kafka": None,
                }
            )
        check_files_and_topic(data, follow, where)
        self.files, self.batch_size = shard_files(data, rank, world_size, where, follow)
        # Followed files come later: their format is the glob's (*.parquet), or data.format.
        self.format = file_format(data, self.files or [data.inputs or ""])
        self.data = data
        self.repeat = repeat
        # A stream, read in arrival order (a Kafka topic, sources/kafka.py, or with `follow` an inputs glob or
        # dated folders, sources/follow.py, or both, sources/mixed.py): the next offset of each partition (the
        # next record of each file) handed out with the batches is position(); with `follow` it waits for
        # new data forever.
        self.rank, self.world_size, self.where, self.follow = rank, world_size, where, follow
        self._offsets: dict = {}  # partition (file) -> next offset (record), of this iteration's batches
        self._resume: Offsets | FilePosition = {}
        self._done_before: datetime | None = None
        self.stream: KafkaRecords | FollowedFiles | FilesAndTopic | None = None
        self._stream_results: _StreamResults | None = None  # the open stream iteration's
        self._tombstones = 0  # Kafka messages without a value passed over by the position
        self.preprocessors = build_preprocessors(data.preprocess, labels=require_labels)
        # What ignore_data_errors skipped; without it, damage raises DataError.
        self._damage = Damage() if data.ignore_data_errors else None
        downsample = next((p for p in self.preprocessors if isinstance(p, NegativeDownsampler)), None)
        self._order = Order(
            self.files,
            data.file_batch_size,
            data.examples_shuffle_buffer_size,
            run_size=self.batch_size * (downsample.config.batch_multiplier if downsample else 1),
            seed=(seed & 0xFFFF_FFFF_FFFF_FFFF, rank),
            shuffle=shuffle,
            repeat=repeat,
            drop_last=drop_last,
        )
        self._columns = Columns(data, self.preprocessors, require_labels, self._damage, self.format)
        self._chunk = max(BLOCK, READ_AHEAD // max(1, min(data.file_batch_size, len(self.files))))
        self._start = 0
        self._maps: set[OrderedMap] = set()
        self._cache = DecodedCache(data, require_labels, where) if data.cache else None
        # What runs on a batch's rows: from the cache, only downsample_negatives (it depends on the batch;
        # the cache holds the rows after the others).
        self._batch_preprocessors = self.preprocessors
        if self._cache:
            self._batch_preprocessors = [downsample] if downsample else []
        self._replayed: Counter[str] = Counter()  # defaults_filled of the files read from the cache
        self._replayed_lock = threading.Lock()
        self._log_reading(shuffle, repeat, drop_last)

    def _log_reading(self, shuffle: bool, repeat: bool, drop_last: bool) -> None:
        data, place = self.data, (self.rank, self.world_size, self.batch_size)
        if self.follow or data.kafka is not None:  # no files of its own: a stream, read in arrival order
            how = "as it arrives" if self.follow else "to its end"
            log.info(
                "%s: %s, %s, in arrival order, for rank %d of %d, batches of %d examples",
                self.where,
                source_name(data),
                how,
                *place,
            )
            return
        log.info(
            "%s: %d files for rank %d of %d, batches of %d examples (shuffle=%s, repeat=%s, drop_last=%s)",
            self.where,
            len(self.files),
            *place,
            shuffle,
            repeat,
            drop_last,
        )

    @property
    def damaged_files(self) -> list[str]:
        """The files whose rest was skipped after damage (ignore_data_errors), as often as each was read."""
        return self._damage.files if self._damage else []

    def counts(self) -> dict[str, int]:
        """What reading met so far, over every iteration of this dataset; safe to call from any thread.
        kafka_lag_records (a Kafka topic): records behind the partitions' ends (sources/kafka.py: lag);
        kafka_tombstones_skipped: messages without a value (a delete by key) passed over, neither decoded nor
        trained, among those the batches handed out so far went past;
        follow_lag_files (followed files): files taken and not handed out to their end yet.
        defaults_filled: features absent from a record, which took the schema default (and, for each
        schema feature that was, defaults_filled/NAME); damaged_files and skipped_records: the files cut
        short and the records left out by ignore_data_errors. A repeating read counts them every epoch."""
        filled = self._columns.defaults_filled()
        with self._replayed_lock:
            filled.update(self._replayed)
        stream = {}
        kafka, files = self._streams()
        if kafka is not None:
            stream["kafka_lag_records"] = kafka.lag({**self._resume, **self._offsets})
            stream["kafka_tombstones_skipped"] = self._tombstones
        if files is not None:
            stream["follow_lag_files"] = files.lag(self._offsets)
        return {
            **stream,
            "defaults_filled": filled.total(),
            "damaged_files": len(self.damaged_files),
            "skipped_records": self._damage.records if self._damage else 0,
            **{f"defaults_filled/{name}": n for name, n in sorted(filled.items()) if n},
        }

    def skip_to(self, batches_consumed: int) -> None:
        """The next iteration starts after `batches_consumed` batches, exactly where an uninterrupted one
        would be. The skipped records are read again (inflated, checksummed, shuffled) to rebuild the order,
        but not decoded: this costs about the reading time of the skipped examples."""
        self._start = batches_consumed

    def position(self) -> Offsets | FilePosition:
        """Where the batches handed out so far leave a stream, for what they read (the rest: absent): Kafka,
        partition -> the next offset (or the start, where it is a number); followed files, path ->
        FilePosition's entry. The trainer keeps it in
        its checkpoints, over what resume() gave."""
        if isinstance(self.stream, FollowedFiles | FilesAndTopic):
            return self.stream.position(self._offsets)
        return dict(self._offsets)

    def resume(self, position: Offsets | FilePosition, done_before: datetime | None = None) -> None:
        """A stream's next iteration goes on from `position` (a checkpoint's, as position() gave it), and
        dated folders from the day `done_before` (the checkpoint's watermark: sources/follow.py)."""
        self._resume = dict(position)
        self._done_before = done_before

    def folders_done_before(self) -> datetime | None:
        """Followed dated folders: this rank's watermark (FollowedFiles.done_before); None for anything else,
        or before the stream is open."""
        _, files = self._streams()
        return None if files is None else files.done_before(self._offsets)

    def forget_folders_before(self, day: datetime) -> None:
        """Followed dated folders: position() and the stream let go of the files of the days before `day`, a
        watermark every rank has passed (the lowest of their folders_done_before)."""
        _, files = self._streams()
        if files is not None:
            self._offsets = without_days_before(self._offsets, day, self.data)
            files.forget(day)  # after the progress: position() never names a file the stream let go of

    def __iter__(self) -> Iterator[Batch]:
        start, self._start = self._start, 0
        if self.data.kafka is not None or self.follow:  # skip_to has no meaning: the position says where
            return self._stream_batches(self._open_stream())  # reading starts now: see ready()
        return self._file_batches(start)

    def ready(self, timeout: float) -> bool:
        """A stream: whether the open iteration's next batch (or its end, or its error) is there to take,
        waiting up to `timeout` seconds for it."""
        return self._stream_results is not None and self._stream_results.ready(timeout)

    def _file_batches(self, start: int) -> Iterator[Batch]:
        if self._cache is not None:
            self._cache.start(self._order.epoch_files(0))
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
                if batch is not None:  # None: every record damaged (ignore_data_errors)
                    yield batch
        finally:
            batches.close()
            self._maps.discard(batches)

    def close(self) -> None:
        """Stops the threads of every iteration still open."""
        if self.stream is not None:
            self.stream.stop()
        for batches in list(self._maps):
            batches.close()
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> RecapDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_stream(self) -> OrderedMap:
        place = {"rank": self.rank, "world_size": self.world_size, "where": self.where}
        kafka = files = None
        if self.data.kafka is not None:
            offsets = {p: offset for p, offset in self._resume.items() if isinstance(p, int)}
            kafka = KafkaRecords(self.data.kafka, follow=self.follow, resume=offsets, **place)
        if self.follow and files_source_name(self.data) is not None:
            positions = {path: entry for path, entry in self._resume.items() if isinstance(path, str)}
            files = FollowedFiles(self.data, resume=positions, done_before=self._done_before, **place)
        self.stream = FilesAndTopic(files, kafka) if kafka and files else kafka or files
        # Where each partition starts, when a number (start: latest, a time, a resume): a restart goes on from
        # there, even before a message of it is trained on.
        self._offsets = {p: offset for p, offset in kafka.offsets.items() if offset >= 0} if kafka else {}
        order = self._order
        batches = OrderedMap(
            lambda pool: runs(self._stream_records(pool), order.run_size, order.drop_last),
            self._positioned_batch,
            skip=0,
            read_workers=1,
            map_workers=self.data.map_num_parallel_calls or max(1, len(os.sched_getaffinity(0)) // 4),
        )
        self._maps.add(batches)
        self._stream_results = _StreamResults(batches, self._advance)
        return batches

    def _stream_batches(self, batches: OrderedMap) -> Iterator[Batch]:
        try:
            yield from self._stream_results
        finally:
            self.stream.stop()  # a stream that waits for data never reaches the producer's stop check
            batches.close()
            self._maps.discard(batches)
            self._stream_results = None
            self.stream.close()

    def _advance(self, advanced: dict, tombstones: int) -> None:
        """The position past a run of the stream, handed out (or, without a batch, passed over)."""
        self._offsets.update(advanced)
        self._tombstones += tombstones

    def _streams(self) -> tuple[KafkaRecords | None, FollowedFiles | None]:
        """The open stream's topic and followed files, each None where it has none."""
        if isinstance(self.stream, FilesAndTopic):
            return self.stream.kafka, self.stream.files
        return (self.stream, None) if isinstance(self.stream, KafkaRecords) else (None, self.stream)

    def _stream_records(self, pool: ThreadPoolExecutor) -> Iterator[Item]:
        if isinstance(self.stream, KafkaRecords):
            return iter(self.stream)
        return self.stream.records(lambda path: self._open(path, pool))

    def _positioned_batch(self, items: list[Item]) -> tuple[Batch | None, dict, int]:
        """The batch of a run of a stream's records, the next offset of each partition (the next record
        of each file) after it, a partition by its number, a file by its path, ascending in each; and how
        many Kafka tombstones (no value: a delete by key, not a record) the run held. They are left out, so
        the batch is that much shorter; a run of tombstones alone makes none (no error, even with drop_last:
        nothing was damaged)."""
        kafka, _ = self._streams()
        names = kafka.names if kafka else {}
        advanced = {names.get(name, name): index + 1 for _, name, index in items}
        records = [item for item in items if item[0] is not None]
        try:
            return (self._make_batch(records) if records else None), advanced, len(items) - len(records)
        except DataError as e:  # a message's index is its offset
            raise DataError(_MESSAGE.sub(r"\1: offset ", str(e), count=1)) from None

    def _runs(self, pool: ThreadPoolExecutor) -> Iterator[list[Item]]:
        return self._order.runs(lambda path: self._open(path, pool))

    def _open(self, path: str, pool: ThreadPoolExecutor) -> Iterator[Item]:
        if self._cache is not None:
            return self._open_cached(path)
        # The reader starts reading now, so that every file of a group is being read before it is needed.
        records = self.format.read(path, self._columns.wanted_specs)
        reader = FileReader(path, records, pool, self._chunk, self._damage)
        return ((record, path, index) for index, record in enumerate(reader))

    def _open_cached(self, path: str) -> Iterator[Item]:
        entry = self._cache.open(path)
        damage = entry.damage
        if damage["records"] or damage["file"]:
            if self._damage is None:  # cached by a run with ignore_data_errors
                raise DataError((damage["messages"] or [damage["file"]])[0])
            self._damage.replay(path, damage)
        with self._replayed_lock:
            self._replayed.update(entry.defaults_filled)
        return ((entry, path, index) for index in range(len(entry)))

    def _make_batch(self, items: list[Item]) -> Batch | None:
        rows = gather(items, self._columns.tasks) if self._cache else self._decoded_rows(items)
        if rows is None:
            _, path, index = items[0]
            if self._order.drop_last:
                raise DataError(
                    f"every one of the {len(items)} records of a training batch is damaged (the first: "
                    f"{path}: record {index}); ignore_data_errors leaves damaged records out, but a batch "
                    f"must keep one"
                )
            return None
        for preprocessor in self._batch_preprocessors:
            rows = preprocessor.apply(rows)
        return self._columns.batch(with_final_labels(rows))

    def _decoded_rows(self, items: list[Item]) -> Rows | None:
        decoded = self._columns.decode(items)
        return None if decoded is None else self._columns.rows(decoded[0])


class _StreamResults:
    """A stream's batches, from the (batch, advanced, tombstones) results of its OrderedMap: each result's
    position goes to `advance` as its batch is handed out. A result without a batch (a run of tombstones
    alone) is passed over, by ready() too: ready() means a batch is there, so that under DDP no rank told
    so then waits for data inside the step's collectives."""

    _END = object()

    def __init__(self, results: OrderedMap, advance: Callable[[dict, int], None]):
        self._map, self._results, self._advance = results, iter(results), advance
        self._ahead: list = []  # what ready() took and next() has not handed out: a result, _END or an error

    def ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._ahead:
            if not self._map.ready(max(0.0, deadline - time.monotonic())):
                return False
            try:
                result = next(self._results, self._END)
            except Exception as error:  # raised when next() reaches it
                result = error
            if isinstance(result, tuple) and result[0] is None:
                self._advance(*result[1:])
            else:
                self._ahead.append(result)
        return True

    def __iter__(self) -> Iterator[Batch]:
        while True:
            result = self._ahead.pop() if self._ahead else next(self._results, self._END)
            if isinstance(result, Exception):
                raise result
            if result is self._END:
                return
            batch, advanced, tombstones = result
            self._advance(advanced, tombstones)
            if batch is not None:
                yield batch


def describe_counts(counts: dict[str, int]) -> str:
    """RecapDataset.counts() for a log line, under the names of its keys:
    "defaults_filled=3 (disc=2, a=1), damaged_files=1, skipped_records=0"."""
    prefix = "defaults_filled/"
    features = ", ".join(f"{k.removeprefix(prefix)}={n}" for k, n in counts.items() if k.startswith(prefix))
    return (
        f"defaults_filled={counts['defaults_filled']}{f' ({features})' if features else ''}, "
        f"damaged_files={counts['damaged_files']}, skipped_records={counts['skipped_records']}"
    )


def total_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """The counts() of several datasets (one per rank) added up."""
    total: Counter[str] = Counter()
    for one in counts:
        total.update(one)  # unlike Counter's +, update keeps the zeros
    return dict(total)
