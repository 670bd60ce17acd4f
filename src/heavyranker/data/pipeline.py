"""The threads of the data pipeline: reader threads read files ahead, decoder threads turn runs of records
into batches, one producer thread hands out the work in order and the consumer gets the results in that
order (data/order.py decides it, so thread timing never changes a batch).

Threads, not processes: inflate (isal), CRC32C and most of numpy release the GIL, and threads hand records
and arrays over without copying or pickling them. The queue between producer and consumer holds at most
`decoder threads + PREFETCH` batches and the readers of a group about 2 * READ_AHEAD records, so memory
stays flat whatever the dataset's size."""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Generic, TypeVar

from ..errors import DataError
from .damage import Damage

READ_AHEAD = 1024  # records read ahead for a group of files, in chunks of READ_AHEAD / files
PREFETCH = 2  # batches decoded ahead of the consumer, beyond one per decoder thread

T = TypeVar("T")
R = TypeVar("R")


class FileReader:
    """A file's records (`records`, as its source reads them), read `chunk` at a time by a reader thread, one
    chunk ahead of the consumer. It starts reading when made. Damage in the file raises DataError, or with
    `damage` (ignore_data_errors) ends the file there and is reported to it."""

    def __init__(
        self, path: str, records: Iterator, pool: ThreadPoolExecutor, chunk: int, damage: Damage | None
    ):
        self.path = path
        self._records = records
        self._pool = pool
        self._chunk = chunk
        self._damage = damage
        self._next = pool.submit(self._read_chunk)

    def __iter__(self) -> Iterator:
        while chunk := self._next.result():
            self._next = self._pool.submit(self._read_chunk)
            yield from chunk

    def _read_chunk(self) -> list:
        chunk: list = []
        try:
            for record in self._records:
                chunk.append(record)
                if len(chunk) == self._chunk:
                    break
        except DataError as e:
            if self._damage is None:
                raise
            self._damage.file(self.path, e)
        return chunk


class OrderedMap(Generic[T, R]):
    """fn over the items of source(reader pool), on map_workers decoder threads, yielded in source order.

    A producer thread draws the items (skipping the first `skip`) and submits them to the decoder pool;
    `source` gets the reader pool, on which it reads ahead. The bounded queue of futures between producer
    and consumer keeps the work ahead of the consumer at map_workers + PREFETCH items. Iterate once."""

    _END = object()

    def __init__(
        self,
        source: Callable[[ThreadPoolExecutor], Iterator[T]],
        fn: Callable[[T], R],
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
            target=self._produce, args=(source, fn, skip), name="heavyranker-order", daemon=True
        )
        self._thread.start()

    def _produce(
        self, source: Callable[[ThreadPoolExecutor], Iterator[T]], fn: Callable[[T], R], skip: int
    ) -> None:
        _yield_to_the_model()
        try:
            for item in islice(source(self._read_pool), skip, None):
                if not self._put(self._map_pool.submit(fn, item)):
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

    def __iter__(self) -> Iterator[R]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item.result()

    def ready(self, timeout: float) -> bool:
        """Whether the next result (or the end, or an error) is there to take, waiting up to `timeout`."""
        with self._queue.not_empty:  # the queue's own lock: len() of its deque, not qsize(), which takes it
            return self._queue.not_empty.wait_for(lambda: len(self._queue.queue) > 0, timeout)

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
