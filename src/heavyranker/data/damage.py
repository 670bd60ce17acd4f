"""What ignore_data_errors skips, counted and logged: damaged files (the rest of the file is skipped) and
damaged records (the record is skipped). Reader threads report files and decoder threads records, so the
counts are kept under a lock."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from ..errors import DataError

log = logging.getLogger(__name__)

LOGGED_PER_FILE = 3  # damaged records of one file logged one by one; then only at 10, 100, 1000, ...


class Damage:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: list[str] = []
        self._records: Counter[str] = Counter()

    @property
    def files(self) -> list[str]:
        """The damaged files, in the order they were found."""
        with self._lock:
            return list(self._files)

    @property
    def records(self) -> int:
        """The damaged records skipped, all files together."""
        with self._lock:
            return self._records.total()

    def file(self, path: str, error: DataError) -> None:
        with self._lock:
            self._files.append(path)
            files = len(self._files)
        log.warning(
            "%s; ignore_data_errors: skipped the rest of the file (%d damaged files so far)", error, files
        )

    def record(self, path: str, error: DataError) -> None:
        """Counts a skipped record of `path`. Logs the first LOGGED_PER_FILE of each file, then the file's
        count at 10, 100, 1000, ...: a file whose every record is damaged must not flood the log."""
        with self._lock:
            self._records[path] += 1
            count = self._records[path]
        if count < LOGGED_PER_FILE:
            log.warning("%s; ignore_data_errors: skipped the record", error)
        elif count == LOGGED_PER_FILE:
            log.warning(
                "%s; ignore_data_errors: skipped the record; the file's next damaged records are counted, "
                "and logged at 10, 100, 1000, ...",
                error,
            )
        elif str(count).rstrip("0") == "1":  # 10, 100, 1000, ...
            log.warning("%s: %d damaged records skipped so far (ignore_data_errors)", path, count)

    def replay(self, path: str, summary: dict) -> None:
        """Counts and logs again the damage met when `path` was decoded into the cache (data/cache.py), as
        reading the file again would."""
        messages = summary["messages"]
        for i in range(summary["records"]):
            self.record(path, DataError(messages[min(i, len(messages) - 1)]))
        if summary["file"]:
            self.file(path, DataError(summary["file"]))
