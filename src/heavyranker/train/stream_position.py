"""Where a training's data stands, kept in every checkpoint so that a restarted run resumes exactly: a
stream's position, all ranks' (data/sources/follow.py: Kafka's next offsets, followed files' records, dated
folders' watermark), and the time of the newest data read (data/data_time.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..config import Config
from ..data.data_time import newest_data_time
from ..data.dataset import RecapDataset
from ..data.sources.follow import (
    checkpoint_position,
    restore_done_before,
    restore_position,
    without_days_before,
)
from ..runtime import Runtime


class StreamPosition:
    def __init__(self, config: Config, runtime: Runtime):
        self.data, self.follow, self.runtime = config.train_data, config.training.follow, runtime
        self.position: dict = {}  # a partition -> its next offset, a followed file's path -> its entry
        self.done_before: datetime | None = None  # dated folders' watermark, which every rank is past
        self.newest_data_time: float | None = None

    def restore(self, state: dict[str, Any]) -> None:
        """What a checkpoint's `state` holds."""
        self.position = restore_position(state, self.data)
        self.done_before = restore_done_before(state, self.data)
        self.newest_data_time = state.get("newest_data_time")

    def resume(self, dataset: RecapDataset) -> None:
        dataset.resume(self.position, self.done_before)

    def save(self, state: dict[str, Any], dataset: RecapDataset | None) -> None:
        """Into a checkpoint's `state`, on rank 0."""
        if dataset is not None:
            self.newest_data_time = newest_data_time(dataset, self.newest_data_time)
        state["newest_data_time"] = self.newest_data_time
        position = checkpoint_position(self.data, self.position, self.follow, self.done_before)
        if position is not None:
            state["data_position"] = position

    def gather(self, dataset: RecapDataset, due: bool) -> None:
        """Every rank's stream position, after a step (a checkpoint holds the position after the records of
        its steps). Under DDP a collective: only where a checkpoint may be saved (`due`, on every rank)."""
        if not due:
            if self.runtime.world_size == 1:  # a save at num_train_steps holds the position of its steps too
                self.position.update(dataset.position())
            return
        # Each rank reads its own files or partitions: a checkpoint's newest_data_time is the newest any
        # rank has read, not rank 0's alone; its folders_done_before, the oldest any rank has not passed.
        mine = (
            dataset.position(),
            newest_data_time(dataset, self.newest_data_time),
            dataset.folders_done_before(),
        )
        ranks = self.runtime.gather(mine)
        for offsets, _, _ in ranks:
            self.position.update(offsets)
        self.newest_data_time = max((t for _, t, _ in ranks if t is not None), default=None)
        self._forget_done_folders(dataset, [day for _, _, day in ranks])

    def _forget_done_folders(self, dataset: RecapDataset, days: list[datetime | None]) -> None:
        """Dated folders: the position and the stream let go of the days every rank is past (`days`, each
        rank's watermark), so that neither grows with the folders a follow run has read."""
        if None in days or (self.done_before is not None and min(days) <= self.done_before):
            return
        self.done_before = min(days)
        self.position = without_days_before(self.position, self.done_before, self.data)
        dataset.forget_folders_before(self.done_before)
