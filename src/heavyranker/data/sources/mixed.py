"""Follow mode on a Kafka topic and files at once: train_data with `kafka` beside an `inputs` glob or dated
folders, under training.follow. Each stream is read by a thread of its own into one queue of QUEUE_RECORDS
records, and the batches take the records in the order they were put: arrival order across the two streams,
each stream's own order within it (a partition's offsets, a file's records, files in listing order). When
both have records ready and the queue is full, the two readers put in turn (the queue lets its waiting
writers in the order they came), so neither starves the other.

The position is the two streams' positions side by side in one dict: a file's path -> its entry
(sources/follow.py), a partition's number -> its next offset (sources/kafka.py)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .. import pipeline
from .follow import FollowedFiles, Item
from .kafka import KafkaRecords

QUEUE_RECORDS = 256
_ENDED = object()  # a reader's last put


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class FilesAndTopic:
    """This rank's followed files and Kafka partitions as one stream of records, in arrival order."""

    def __init__(self, files: FollowedFiles, kafka: KafkaRecords):
        self.files, self.kafka = files, kafka
        self._stop = threading.Event()
        self._readers: list[threading.Thread] = []

    @property
    def newest(self) -> str | None:
        return self.files.newest

    @property
    def newest_timestamp(self) -> float | None:
        return self.kafka.newest_timestamp

    @property
    def taken(self) -> list[str]:
        return self.files.taken

    @property
    def last_taken(self) -> str | None:
        return self.files.last_taken

    def records(self, open_file: Callable[[str], Iterator[Item]]) -> Iterator[Item]:
        """The records of both streams as their readers put them, until stop(); open_file: FollowedFiles'."""
        arrived: queue.Queue = queue.Queue(QUEUE_RECORDS)
        streams = {"kafka": iter(self.kafka), "files": self.files.records(open_file)}
        self._readers = [
            threading.Thread(target=self._read, args=(stream, arrived), name=f"follow-{name}", daemon=True)
            for name, stream in streams.items()
        ]
        for reader in self._readers:
            reader.start()
        ended = 0
        while ended < len(self._readers) and not self._stop.is_set():
            try:
                item = arrived.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _ENDED:
                ended += 1
            elif isinstance(item, _Failed):
                self.stop()
                raise item.error
            else:
                yield item

    def _read(self, stream: Iterator[Any], arrived: queue.Queue) -> None:
        # A data thread, as the pipeline's own; through the module, which bench/train_throughput.py stubs.
        pipeline._yield_to_the_model()
        try:
            for item in stream:
                if not self._put(arrived, item):
                    return
            self._put(arrived, _ENDED)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(arrived, _Failed(error))

    def _put(self, arrived: queue.Queue, item: object) -> bool:
        """Puts `item`, waiting for room until stop(); False if stopped first."""
        while not self._stop.is_set():
            try:
                arrived.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def position(self, progress: dict) -> dict:
        """The files' positions (path keys of `progress`) and the partitions' next offsets (number keys)."""
        paths = {key: n for key, n in progress.items() if isinstance(key, str)}
        return self.files.position(paths) | {key: n for key, n in progress.items() if isinstance(key, int)}

    def stop(self) -> None:
        """Ends the iteration (from another thread) within a poll of either stream."""
        self._stop.set()
        self.files.stop()
        self.kafka.stop()

    def close(self) -> None:
        self.stop()
        for reader in self._readers:  # the Kafka client is not to be closed while its reader polls
            reader.join()
        self.kafka.close()
