"""The time of the newest data a training has read, which a checkpoint carries (`newest_data_time`) into
export's manifest and serve's staleness metric: a Kafka source's newest message's broker time, else the
modification time of the newest of the dataset's files (a followed glob's newest file, a dated folder's
newest file)."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from .dataset import RecapDataset
from .storage import filesystem, is_url, local


def newest_data_time(dataset: RecapDataset, before: float | None = None) -> float | None:
    """Seconds since the epoch of the newest data `dataset` has read, or `before` (what a resumed run's
    checkpoint said) if that is newer or nothing is known yet."""
    if dataset.kafka is not None:
        found = dataset.kafka.newest_timestamp
    else:
        found = max((modified_time(f) for f in dataset.files), default=None)
    return max((t for t in (found, before) if t is not None), default=None)


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
