"""The order of one rank's records: a function of its files, the seed and the reading flags only, never of
thread timing, so that the same seed gives the same batches.

  files (shuffled per epoch with `shuffle`)
  -> groups of file_batch_size files, their records interleaved in blocks of BLOCK
  -> a shuffle buffer of examples_shuffle_buffer_size records (with `shuffle`)
  -> again from the start, epoch after epoch (with `repeat`)
  -> runs of run_size records, one per batch (the last, short one dropped with `drop_last`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import numpy as np

from ..errors import DataError

BLOCK = 4  # records taken from one file before the interleave moves to the next

Item = tuple[Any, str, int]  # a record (as its source reads it), its file and its index in that file


@dataclass(frozen=True)
class Order:
    files: list[str]
    file_batch_size: int
    shuffle_buffer_size: int
    run_size: int
    seed: tuple[int, int]  # (seed, rank): numpy's SeedSequence takes non-negative integers
    shuffle: bool
    repeat: bool
    drop_last: bool

    def runs(self, open_file: Callable[[str], Iterator[Item]]) -> Iterator[list[Item]]:
        """The records in runs of run_size; open_file(path) gives a file's records (and may start reading
        them: every file of a group is opened before its records are needed)."""
        records = self.records(open_file)
        if self.shuffle and self.shuffle_buffer_size > 1:
            records = shuffle(records, self.shuffle_buffer_size, np.random.default_rng([*self.seed, 1]))
        return runs(records, self.run_size, self.drop_last)

    def records(self, open_file: Callable[[str], Iterator[Item]]) -> Iterator[Item]:
        for epoch in count() if self.repeat else range(1):
            files = self.epoch_files(epoch)
            empty = True
            for first in range(0, len(files), self.file_batch_size):
                group = files[first : first + self.file_batch_size]
                for item in interleave([open_file(path) for path in group], BLOCK):
                    empty = False
                    yield item
            if empty:  # a repeating stream would look for records forever
                raise DataError(
                    f"no records could be read from any of the {len(files)} files ({files[0]}, ...): "
                    f"they are empty, or damaged and skipped (ignore_data_errors)"
                )

    def epoch_files(self, epoch: int) -> list[str]:
        if not self.shuffle:
            return self.files
        permutation = np.random.default_rng([*self.seed, 0, epoch]).permutation(len(self.files))
        return [self.files[i] for i in permutation]


def runs(records: Iterator[Item], size: int, drop_last: bool) -> Iterator[list[Item]]:
    """The records in runs of `size` (the last, short one dropped with drop_last)."""
    while run := list(islice(records, size)):
        if len(run) < size and drop_last:
            return
        yield run


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
