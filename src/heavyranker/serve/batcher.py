"""Dynamic batching: concurrent requests share one forward of the model, and each gets its own rows back.

A forward has a fixed cost whatever its size (bench/serve_latency.py measures it against the served
latency; bench/results/serve_latency.json has the figures), so requests scored together finish sooner than
one after another. One thread owns the model: it takes the oldest request, adds those queued behind it
while they fit in `max_batch` candidates and the oldest has waited less than `wait_s`, runs one forward and
splits its outputs by request. While a forward runs, the next requests queue: under load, batches fill
without waiting at all; the wait only delays a request that arrives at an idle model, by at most wait_s.

Rows are scored independently (batch norm in eval mode, no cross-candidate feature), so a request's results
do not depend on its batch mates; a matrix product may round differently for another number of rows (the
kernel blocks the batch dimension by its size), by an ulp or so.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .scorer import Scorer

Arrays = Mapping[str, np.ndarray]
Outputs = tuple[np.ndarray, np.ndarray]  # probabilities [n, T], score [n]


@dataclass
class _Job:
    arrays: Arrays
    rows: int
    scorer: Scorer  # the model version the request started with (versions.py)
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """`await batcher.score(arrays)` -> (probabilities, score) of these rows, as float32 numpy arrays.

    `with batcher:` runs the thread that owns the model; `on_batch(candidates)` is called for each forward.
    A request larger than max_batch is scored alone, never split. config.serving.ServeOptions checks the
    settings (max_batch >= 1, wait_ms >= 0) and gives their defaults. `scorer`: the one score() uses when
    given none; None where each call gives its own (a server: a default would hold its first version for
    the server's life, whatever versions swapped in since)."""

    def __init__(
        self,
        scorer: Scorer | None,
        *,
        max_batch: int,
        wait_ms: float,
        on_batch: Callable[[int], None] = lambda candidates: None,
    ):
        self.scorer = scorer
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1e3
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Batcher:
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def waiting(self) -> int:
        """Requests queued for a forward (not counting one held over for the next batch)."""
        return self._queue.qsize()

    async def score(self, arrays: Arrays, scorer: Scorer | None = None) -> Outputs:
        """The rows' outputs from `scorer` (default: the batcher's), batched only with requests to it."""
        scorer = scorer or self.scorer
        assert scorer is not None, "a Batcher made without a scorer is given one by each call"
        rows = len(next(iter(arrays.values())))
        if rows == 0:
            return np.zeros((0, len(scorer.tasks)), np.float32), np.zeros(0, np.float32)
        job = _Job(arrays, rows, scorer)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _run(self) -> None:
        carried: _Job | None = None  # the job that did not fit in the last batch: it opens the next one
        while True:
            first = carried or self._queue.get()
            if first is None:
                return
            batch, carried = self._gather(first)
            self._forward(batch)
            # Not held while waiting for the next: it holds its version's scorer, which an idle server kept
            # beside the one swapped in since, a model's size, until the next request came.
            del first, batch

    def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """`first` and the jobs queued behind it that fit; the next job if it did not fit."""
        batch, rows = [first], first.rows
        deadline = first.arrived + self.wait_s
        while rows < self.max_batch:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # closed: this batch is the last, and the loop meets the end mark again
                self._queue.put(None)
                break
            if rows + job.rows > self.max_batch or job.scorer is not first.scorer:
                return batch, job
            batch.append(job)
            rows += job.rows
        return batch, None

    def _forward(self, batch: list[_Job]) -> None:
        # A job whose caller went away (its asyncio future cancelled) is dropped here.
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        scorer = jobs[0].scorer
        try:
            features = {
                spec.name: torch.from_numpy(np.concatenate([job.arrays[spec.name] for job in jobs]))
                for spec in scorer.inputs
            }
            self.on_batch(sum(job.rows for job in jobs))
            probabilities, score = (t.float().numpy() for t in scorer(features))
        except Exception as e:  # every caller learns it; the thread serves the next batch
            for job in jobs:
                job.future.set_exception(e)
            return
        start = 0
        for job in jobs:
            end = start + job.rows
            job.future.set_result((probabilities[start:end], score[start:end]))
            start = end


def first_non_finite(probabilities: np.ndarray, score: np.ndarray) -> int | None:
    """The first row whose outputs are not all finite, or None. Finite inputs can still make one (a value
    so large that a normalisation overflows): the caller answers that row's request with a 4xx."""
    bad = ~np.isfinite(probabilities).all(axis=1) | ~np.isfinite(score)
    return int(np.argmax(bad)) if bad.any() else None
