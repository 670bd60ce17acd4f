"""Follow mode (training.follow, `train --follow`): which sources can be followed, the files of a followed
glob or dated folders as they come, and the position of a followed source as a checkpoint keeps it.

A followed file source is read file after file, in arrival order, without a shuffle buffer (it would hold
records across a checkpoint). Its position is, for each file trained on, the records trained (`next`, the
index of the next one), whether the file was read to its end (`done`) and its version when it was first
listed (storage.file_version: size and mtime, or size and ETag on object storage).

Dated folders also have a watermark, `folders_done_before` (a day): every folder of an earlier day was listed
and each of its files handed out to its end. The files of those days leave the position and what the stream
remembers, and a restart lists from that day on, as the running stream does: what a follow run holds stays
that of a day or two of folders however long it runs (a glob's position keeps every file it matched: a glob
has no order that says a file will not come again)."""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from ...config import Config
from ...config.data import DataConfig
from ...errors import UserError
from . import FORMATS
from .files import dated_folders, folder_versions, glob_versions, holds_file
from .kafka import Offsets

log = logging.getLogger(__name__)

Item = tuple[Any, str, int]  # a record, its file and its index in that file (order.Item)
FilePosition = dict[str, dict]  # path -> {"next": int, "done": bool, "version": dict}


def follow_sources(config: Config) -> None:
    """Raise, before anything is read, when training.follow is set on a source that cannot be followed, or
    is not set on one that is read only when followed (a topic together with files)."""
    data = config.train_data
    if config.training.follow and data.kafka is None and data.cache:
        raise UserError(
            "training.follow (train --follow): train_data.cache: true caches a fixed set of files; followed "
            "files are read once, as they come: set cache: false"
        )
    check_files_and_topic(data, config.training.follow, "train_data")
    dated = data.explicit_datetime_inputs or data.explicit_date_inputs
    if config.training.follow and dated is not None and dated.latest:
        raise UserError(
            "training.follow (train --follow): train_data's dated folders end at latest, which is for a "
            "split read whole (a held-out split); a followed run reads on past a given day (hour), and a "
            "restart must start where the first run did: give one"
        )


def files_source_name(data: DataConfig) -> str | None:
    """What a files position belongs to: the glob, or the dated folders' data_root; None: no files."""
    if data.inputs is not None:
        return f"inputs {data.inputs}"
    dated = data.explicit_datetime_inputs or data.explicit_date_inputs
    return None if dated is None else f"dated folders {dated.data_root}"


def source_name(data: DataConfig) -> str:
    """What a position belongs to: the glob or the dated folders' data_root, and (or) the topic."""
    names = [files_source_name(data), data.kafka and f"kafka topic {data.kafka.topic}"]
    return " and ".join(name for name in names if name)


def check_files_and_topic(data: DataConfig, follow: bool, where: str) -> None:
    """A topic together with files (sources/mixed.py) is read only in follow mode: UserError otherwise."""
    if data.kafka is None or files_source_name(data) is None:
        return
    if not follow:
        raise UserError(
            f"{where}: kafka together with {files_source_name(data)} is read only in follow mode "
            "(training.follow, train --follow, on train_data); elsewhere keep one of them"
        )
    if data.inputs is not None and data.inputs.lower().endswith(FORMATS["parquet"].suffix):
        raise UserError(
            f"{where}.inputs: {data.inputs} names Parquet files; kafka messages are tf.Examples, and so are "
            "the files read with them (TFRecord)"
        )


def checkpoint_position(
    data: DataConfig, position: dict, follow: bool, done_before: datetime | None = None
) -> dict | None:
    """The `data_position` a checkpoint keeps: Kafka's offsets per partition (the number keys of
    `position`); in follow mode, the files' positions (its path keys) and, for dated folders, the day
    `done_before` (folders_done_before: the watermark, see the module's docstring); none for files read as a
    fixed set (their position is the step)."""
    saved = {}
    if data.kafka is not None:
        offsets = {key: n for key, n in position.items() if isinstance(key, int)}
        saved |= {"topic": data.kafka.topic, "offsets": offsets}
    if follow and files_source_name(data) is not None:
        files = {key: entry for key, entry in position.items() if isinstance(key, str)}
        saved |= {"source": files_source_name(data), "files": files}
        if done_before is not None:
            saved["folders_done_before"] = done_before.date().isoformat()
    return saved or None


def restore_position(state: dict[str, Any], data: DataConfig) -> Offsets | FilePosition:
    """What a checkpoint's `state` holds of `data`'s position: the Kafka offsets of its topic, and (or) the
    positions of its followed files; {} (from the start) when it holds none, or another source's."""
    saved = state.get("data_position")
    if saved is None:
        return {}
    held = _held(saved)
    if held != source_name(data):
        log.warning(
            "the checkpoint holds the position of %s, not of %s: reading %s from its start",
            held,
            source_name(data),
            source_name(data),
        )
        return {}
    offsets = {int(partition): int(offset) for partition, offset in saved.get("offsets", {}).items()}
    return offsets | dict(saved.get("files", {}))


def restore_done_before(state: dict[str, Any], data: DataConfig) -> datetime | None:
    """The watermark of a checkpoint's dated folders (folders_done_before), where restore_position restores
    its position; None: none kept (a glob, a checkpoint before it was kept, another source's)."""
    saved = state.get("data_position") or {}
    day = saved.get("folders_done_before")
    if day is None or _held(saved) != source_name(data):
        return None
    return datetime.fromisoformat(day)


def _held(saved: dict) -> str:
    """What a checkpoint's data_position belongs to, as source_name says it."""
    topic = "topic" in saved and f"kafka topic {saved['topic']}"
    return " and ".join(name for name in (saved.get("source"), topic) if name)


def folder_day(folder: str, hours: bool) -> datetime:
    """The day (midnight) of the dated folder YYYY/MM/DD (with `hours`, YYYY/MM/DD/HH) `folder`."""
    year, month, day = folder.rstrip("/").split("/")[-4 if hours else -3 :][:3]
    return datetime(int(year), int(month), int(day))


def file_day(path: str, hours: bool) -> datetime:
    """The day of the dated folder that holds the file `path`."""
    return folder_day(path.rsplit("/", 1)[0], hours)


def without_days_before(position: dict, day: datetime, data: DataConfig) -> dict:
    """`position` (a file's path -> its entry, a partition -> its offset) less the files of `data`'s dated
    folders of the days before `day`."""
    hours = data.explicit_datetime_inputs is not None
    return {key: n for key, n in position.items() if isinstance(key, int) or file_day(key, hours) >= day}


class FollowedFiles:
    """This rank's share of the files of a followed `inputs` glob or dated folders, listed every
    follow_poll_seconds, in arrival order: the files a listing finds that no earlier one did, sorted by path;
    dated folders, in time order as each becomes complete (the next folder is there, or with follow_complete:
    marker, follow_marker is in it), each folder's files sorted by path. The first listing finds every file
    there is; dated folders are listed from the configured first day (hour) on, past the configured end.

    Rank r of n takes a dated folder's files whose index in the folder is r modulo n, and a glob's files whose
    crc32 of the path is: every rank decides alone, the same way, whenever it lists.

    `resume`: a checkpoint's positions. A file done there is not read again; a file partly trained is read
    on from its `next` record if its version is the one it had, else skipped with a warning. `done_before`:
    its dated folders' watermark (the module's docstring): listing starts at that day, if later than the
    first configured one."""

    def __init__(
        self,
        data: DataConfig,
        *,
        rank: int,
        world_size: int,
        where: str,
        resume: FilePosition,
        done_before: datetime | None = None,
    ):
        self.data, self.rank, self.world_size, self.where = data, rank, world_size, where
        self._resume = resume
        self._versions = {path: entry["version"] for path, entry in resume.items()}  # path -> version read
        self._listed = {path for path, entry in resume.items() if entry["done"]}  # never taken again
        self._counts: dict[str, int] = {}  # path -> records, of the files read to their end
        self._rewritten: set[str] = set()
        self._stop = threading.Event()
        self.taken: list[str] = []  # this rank's files, in the order they are read (since the watermark)
        self.last_taken: str | None = None  # the newest of them, kept past the watermark
        self.newest: str | None = None  # the newest folder (time) or file listed
        self._dated = data.explicit_datetime_inputs or data.explicit_date_inputs
        self._folders_done: set[str] = set()
        self._folders_seen: dict[str, datetime] = {}  # the last listing's folders
        if self._dated is not None:
            hours = data.explicit_datetime_inputs is not None
            span = timedelta(hours=self._dated.hours - 1) if hours else timedelta(days=self._dated.days - 1)
            self._first = (self._dated.end.replace(minute=0) if hours else self._dated.end) - span
            self._since = max(self._first, done_before) if done_before else self._first
            self._hours = hours
        # The day this rank's listing starts at, published once the files it listed are in `taken`; the
        # watermark forget() was last given, applied by the reader at its next listing.
        self._floor = self._since.replace(hour=0) if self._dated else None
        self._forget_before: datetime | None = None
        self._let_go_before: datetime | None = None
        self._suffixes = (FORMATS[data.format or "tfrecord"].suffix,)

    def records(self, open_file: Callable[[str], Iterator[Item]]) -> Iterator[Item]:
        """The records of this rank's files as they come, until stop(); open_file(path) reads a file's."""
        while not self._stop.is_set():
            new = self._new_files()
            for path in new:
                if self._stop.is_set():
                    return
                yield from self._read(path, open_file)
            if not new:
                self._stop.wait(self.data.follow_poll_seconds)

    def position(self, progress: dict[str, int]) -> FilePosition:
        """The positions of the files of `progress` (path -> the records of it handed out so far)."""
        return {
            path: {"next": n, "done": self._counts.get(path) == n, "version": self._versions[path]}
            for path, n in progress.items()
        }

    def lag(self, progress: dict[str, int]) -> int:
        """Files behind: this rank's files taken whose records are not all handed out yet."""
        return sum(1 for path in self.taken if not self._handed_out(path, progress))

    def done_before(self, progress: dict[str, int]) -> datetime | None:
        """Dated folders: this rank's watermark, the first day it may still hand out records of: every folder
        of an earlier day was listed, and each of this rank's files there handed out to its end (`progress`:
        the records of each file handed out so far). None for a glob."""
        floor = self._floor  # read before `taken`: a listing publishes it once its files are there
        if floor is None:
            return None
        pending = next((path for path in self.taken if not self._handed_out(path, progress)), None)
        return floor if pending is None else min(floor, file_day(pending, self._hours))

    def forget(self, before: datetime) -> None:
        """Let go of the files of the days before `before`, a watermark of every rank (the lowest of their
        done_before): none of them is listed or handed out again. The reader lets go at its next listing."""
        self._forget_before = before

    def stop(self) -> None:
        """Ends the iteration (from another thread) within a poll."""
        self._stop.set()

    def close(self) -> None:
        pass

    def _new_files(self) -> list[str]:
        self._let_go()
        mine = []
        for path, version, index in self._dated_listing() if self._dated else self._glob_listing():
            if path in self._listed:
                self._check_version(path, version)
                continue
            self._listed.add(path)
            if index % self.world_size != self.rank:
                continue
            saved = self._resume.get(path)
            if saved is not None and saved["version"] != version:
                log.warning(
                    "%s: %s changed after %d of its records were trained on (version %s, now %s): the rest "
                    "is not read",
                    self.where,
                    path,
                    saved["next"],
                    saved["version"],
                    version,
                )
                continue
            self._versions[path] = version
            mine.append(path)
        self.taken += mine
        self.last_taken = mine[-1] if mine else self.last_taken
        if self._dated:
            self._floor = self._since.replace(hour=0)
        return mine

    def _let_go(self) -> None:
        """What the files of the days before forget()'s watermark took: each structure is replaced whole, so
        that the consumer's thread reads either the old one or the new one."""
        before = self._forget_before
        if before is None or before == self._let_go_before:
            return
        self._let_go_before = before

        def kept(paths):
            return [path for path in paths if file_day(path, self._hours) >= before]

        self.taken = kept(self.taken)
        self._listed = set(kept(self._listed))
        self._versions = {path: self._versions[path] for path in kept(self._versions)}
        self._counts = {path: self._counts[path] for path in kept(self._counts)}
        self._resume = {path: self._resume[path] for path in kept(self._resume)}
        self._rewritten = set(kept(self._rewritten))
        self._folders_done = {f for f in self._folders_done if folder_day(f, self._hours) >= before}

    def _read(self, path: str, open_file: Callable[[str], Iterator[Item]]) -> Iterator[Item]:
        if not holds_file(os.path.dirname(path), os.path.basename(path)):
            log.warning("%s: %s is gone before it was read: left out", self.where, path)
            self._counts[path] = 0
            return
        start = self._resume[path]["next"] if path in self._resume else 0
        # One record behind the reading: the file's count is known before its last record is handed out, so
        # that the position of the batch holding it says the file is done.
        held: Item | None = None
        for item in open_file(path):
            if item[2] < start:  # trained on before a restart
                continue
            if held is not None:
                yield held
            held = item
        self._counts[path] = start if held is None else held[2] + 1
        if held is not None:
            yield held

    def _handed_out(self, path: str, progress: dict[str, int]) -> bool:
        """Whether every record of `path` is handed out: it was read to its end, and `progress` (this run's
        records handed out) reaches its count; a file with none to hand out (empty, gone, or trained to its
        end before a restart) is not in `progress`, and is handed out once read."""
        start = self._resume[path]["next"] if path in self._resume else 0
        return path in self._counts and self._counts[path] == progress.get(path, start)

    def _check_version(self, path: str, version: dict) -> None:
        if path in self._versions and version != self._versions[path] and path not in self._rewritten:
            self._rewritten.add(path)
            log.warning(
                "%s: %s was rewritten after it was read (version %s, now %s): not read again; new data needs "
                "a new file name",
                self.where,
                path,
                self._versions[path],
                version,
            )

    def _glob_listing(self) -> list[tuple[str, dict, int]]:
        versions = glob_versions(self.data.inputs)
        if versions:
            self.newest = max(versions)
        return [(path, version, zlib.crc32(path.encode())) for path, version in versions.items()]

    def _dated_listing(self) -> list[tuple[str, dict, int]]:
        hours = self.data.explicit_datetime_inputs is not None
        folders = [
            (when, f)
            for when, f in dated_folders(self._dated.data_root, self._since, hours)
            if when >= self._first
        ]
        self._note_gone(folders)
        if self.data.follow_complete == "marker":
            complete = [
                (w, f)
                for w, f in folders
                if f not in self._folders_done and holds_file(f, self.data.follow_marker)
            ]
        else:
            complete = [(w, f) for w, f in folders[:-1] if f not in self._folders_done]
        listed = []
        for when, folder in complete:
            self._folders_done.add(folder)
            versions = folder_versions(folder, self._suffixes)
            listed += [(path, version, index) for index, (path, version) in enumerate(versions.items())]
            self.newest = when.strftime("%Y-%m-%d %H:00" if hours else "%Y-%m-%d")
        pending = [when for when, folder in folders if folder not in self._folders_done]
        if folders:  # the next listing starts at the day of the oldest folder not read, else of the newest
            self._since = min(pending) if pending else folders[-1][0]
        return listed

    def _note_gone(self, folders: list[tuple[datetime, str]]) -> None:
        """Warn of a folder that an earlier listing found and this one, over the same days, does not: its
        files not read yet are left out (what was trained on stays trained)."""
        now = {folder: when for when, folder in folders}
        scope = self._since.replace(hour=0)  # this listing's days
        for folder, when in sorted(self._folders_seen.items()):
            if when >= scope and folder not in now:
                log.warning(
                    "%s: the dated folder %s is gone; its files not read by then are left out",
                    self.where,
                    folder,
                )
        self._folders_seen = now
