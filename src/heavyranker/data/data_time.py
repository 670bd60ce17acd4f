"""The time of the newest data a training has read, which a checkpoint carries (`newest_data_time`) into
export's manifest and serve's staleness metric: a Kafka source's newest message's broker time, else the
modification time of the newest of the dataset's files (a followed glob's newest file, a dated folder's
newest file); a topic read with files: the newer of the two."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from .dataset import RecapDataset
from .sources.follow import FollowedFiles
from .sources.kafka import KafkaRecords
from .sources.mixed import FilesAndTopic
from .storage import filesystem, is_url, local


def newest_data_time(dataset: RecapDataset, before: float | None = None) -> float | None:
    """Seconds since the epoch of the newest data `dataset` has read, or `before` (what a resumed run's
    checkpoint said, or an earlier call) if that is newer or nothing is known yet."""
    stream = dataset.stream
    if isinstance(stream, KafkaRecords):
        found = stream.newest_timestamp
    elif isinstance(stream, FollowedFiles):  # files are taken in arrival order: the last is the newest
        found = _modified_or_none(stream.last_taken) if stream.last_taken else None
    elif isinstance(stream, FilesAndTopic):
        newest_file = _modified_or_none(stream.last_taken) if stream.last_taken else None
        found = max((t for t in (newest_file, stream.newest_timestamp) if t is not None), default=None)
    elif before is None:  # a fixed set of files: the same answer at every checkpoint, so asked once
        found = max((t for t in map(_modified_or_none, dataset.files) if t is not None), default=None)
    else:
        found = None
    return max((t for t in (found, before) if t is not None), default=None)


def _modified_or_none(path: str) -> float | None:
    """modified_time(path), or None for a file gone since it was read (its time is then unknown)."""
    try:
        return modified_time(path)
    except OSError:
        return None


def modified_time(path: str) -> float:
    """When a local or remote file was last written (seconds since the epoch)."""
    if not is_url(path):
        return os.stat(local(path)).st_mtime
    return info_time(filesystem(path).info(path))


def info_time(info: dict[str, Any]) -> float:
    """An fsspec listing entry's modification time: s3fs' LastModified, gcsfs' updated, a local mtime."""
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
    if isinstance(modified, str):  # gcsfs: an ISO 8601 time
        modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
    return modified.timestamp() if isinstance(modified, datetime) else float(modified)
