"""Which files a data config reads: an `inputs` glob, or dated folders (data_root/YYYY/MM/DD[/HH]); and
which of them each rank reads. Paths may be fsspec URLs (s3://bucket/...); files are sorted by their full
URL as local ones are by path, so the order and each rank's share do not depend on where the files lie."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta

from ...config.data import (
    DataConfig,
    ExplicitDateInputs,
    ExplicitDatetimeInputs,
)
from ...errors import UserError
from ..storage import error_line, file_version, filesystem, is_url, local, version_of
from . import FORMATS

log = logging.getLogger(__name__)


def select_files(data: DataConfig) -> list[str]:
    """The files `data` names, sorted, cut to `num_files_to_keep`. Raises UserError when none is found,
    or when more dated folders are missing (or hold no data file) than the config tolerates. A dated folder's
    data files are those of data.format (.gz, .parquet), of either when it is not set."""
    suffixes = _suffixes(data)
    if data.inputs is not None:
        files = glob_files(data.inputs)
    elif data.explicit_date_inputs is not None:
        files = date_files(data.explicit_date_inputs, suffixes)
    else:
        assert data.explicit_datetime_inputs is not None  # the config allows exactly one of the three
        files = datetime_files(data.explicit_datetime_inputs, suffixes)
    if data.num_files_to_keep is not None and len(files) > data.num_files_to_keep:
        log.info("keeping %d of %d files (num_files_to_keep)", data.num_files_to_keep, len(files))
        files = files[: data.num_files_to_keep]
    return files


def _suffixes(data: DataConfig) -> tuple[str, ...]:
    """The data files' suffixes: those of data.format (.gz, .parquet), of either when it is not set."""
    return tuple(kind.suffix for name, kind in FORMATS.items() if data.format in (None, name))


def with_end_pinned(data: DataConfig) -> DataConfig:
    """`data` with dated folders that end at `latest` made to end at the newest one now (dated_end), so
    that readers who list them again (each rank of an evaluation) read the same folders."""
    dated = data.explicit_datetime_inputs or data.explicit_date_inputs
    if dated is None or not dated.latest:
        return data
    end = dated_end(dated, _suffixes(data))
    day = folder_name(end, hours=False).replace("/", "-")
    if isinstance(dated, ExplicitDatetimeInputs):
        pinned = {"explicit_datetime_inputs": dated.model_copy(update={"end_datetime": f"{day}T{end:%H}"})}
    else:
        pinned = {"explicit_date_inputs": dated.model_copy(update={"end_date": day})}
    return data.model_copy(update=pinned)


def shard_files(
    data: DataConfig, rank: int, world_size: int, where: str, follow: bool = False
) -> tuple[list[str], int]:
    """This rank's files, files[rank::world_size] of `data`'s sorted files, and its batch size,
    global_batch_size / world_size. Raises UserError naming the config section `where` (train_data,
    validation_data.<split>) when the data cannot be shared that way. With `follow` no file is chosen now:
    a followed source shares its files as they come (sources/follow.py)."""
    if data.global_batch_size % world_size:
        raise UserError(
            f"{where}.global_batch_size: {data.global_batch_size} is not divisible by the world size "
            f"{world_size}; each process takes global_batch_size / {world_size} examples per batch, so "
            f"make it a multiple of {world_size}"
        )
    if data.kafka is not None or follow:  # shared as they are read (sources/kafka.py, sources/follow.py)
        return [], data.global_batch_size // world_size
    files = select_files(data)
    if len(files) < world_size:
        raise UserError(
            f"{where}: {len(files)} data file(s) ({', '.join(files[:3])}) for {world_size} processes; "
            f"each process reads its own files, so split the data into at least {world_size} files"
        )
    return files[rank::world_size], data.global_batch_size // world_size


def check_sharding(sections: Mapping[str, DataConfig], world_size: int, followed: str | None = None) -> None:
    """Each rank reads its own files (files[rank::world_size]) in batches of global_batch_size / world_size.
    Raise now, naming the config section (`sections`: dotted path -> data config, as Config.data_sections),
    if a split cannot be shared that way, rather than when the split is first read (for a validation split,
    maybe hours into training). `followed`: the section read in follow mode, whose files come later."""
    if world_size == 1:
        return
    for where, data in sections.items():
        shard_files(data, 0, world_size, where, follow=where == followed)


def glob_files(pattern: str) -> list[str]:
    """Every file the glob matches, sorted. The pattern chose the files, so any extension is read:
    plain (uncompressed) TFRecord files work too."""
    if is_url(pattern):
        files = _url_glob(pattern)
    else:
        files = _each_file_once(f for f in _local_glob(local(pattern)) if os.path.isfile(f))
    if not files:
        raise UserError(f"no files match inputs {pattern!r}{_missing_bucket(pattern)}")
    return files


def _url_glob(pattern: str) -> list[str]:
    return sorted(_url_glob_versions(pattern))


def _url_glob_versions(pattern: str) -> dict[str, dict]:
    fs = filesystem(pattern)
    found = _listing(lambda: fs.glob(pattern, detail=True).values(), f"inputs {pattern!r}")
    return {fs.unstrip_protocol(info["name"]): version_of(info) for info in found if info["type"] == "file"}


# Listings for follow mode (sources/follow.py): every call lists afresh, and gives each file's version
# (storage.file_version) beside its path, so that a file rewritten after it was read is noticed.


def glob_versions(pattern: str) -> dict[str, dict]:
    """path -> version of every file the glob matches now (none: {}), sorted by path."""
    if is_url(pattern):
        filesystem(pattern).invalidate_cache()
        return dict(sorted(_url_glob_versions(pattern).items()))
    return _local_versions(_each_file_once(_local_glob(local(pattern))))


def folder_versions(folder: str, suffixes: tuple[str, ...]) -> dict[str, dict]:
    """path -> version of the data files (named *SUFFIX) in `folder` now, sorted by path."""
    if not is_url(folder):
        return _local_versions(sorted(_data_files(folder, suffixes)))
    fs = filesystem(folder)
    fs.invalidate_cache()
    entries = _listing(lambda: fs.ls(folder, detail=True), folder)
    named = {fs.unstrip_protocol(entry["name"]): entry for entry in entries if entry["type"] == "file"}
    return {path: version_of(named[path]) for path in sorted(named) if path.lower().endswith(suffixes)}


def _local_glob(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), but `**` enters each folder once: glob's follows links to folders
    without end, and a link loop (a link to a folder above, and one more link) made 2**40 paths, a hang."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return glob.glob(pattern)
    at = parts.index("**")
    head, rest = os.sep.join(parts[:at]) or os.sep * (at > 0), os.sep.join(parts[at + 1 :])  # "/**": "/"
    found: list[str] = []
    for base in glob.glob(head) if head else [os.curdir]:
        seen: set[tuple[int, int]] = set()
        for folder, subfolders, files in os.walk(base, followlinks=True):
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in seen:  # reached through a link already: a loop, or twice
                subfolders.clear()
                continue
            seen.add((status.st_dev, status.st_ino))
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))  # as glob's **
            prefix = os.path.relpath(folder) if not head else folder
            if not rest:
                found += [os.path.join(prefix, name) for name in files if not name.startswith(".")]
            else:
                found += _local_glob(os.path.join(glob.escape(prefix), rest) if prefix != os.curdir else rest)
    return found


def _each_file_once(paths: Iterable[str]) -> list[str]:
    """`paths` sorted, less those of a file listed already: `**` goes through links to folders, so a link
    to a folder above (a loop) listed each file 40 times, and a second link to a day's folder each of its
    files twice; each was trained on that often. Of a file's paths, the one of fewest folders is kept."""
    chosen: dict[tuple[int, int], str] = {}
    for path in sorted(paths, key=lambda p: (p.count(os.sep), p)):
        try:
            status = os.stat(path)
        except OSError:  # gone since it was listed, or a dangling link: as if not listed
            continue
        chosen.setdefault((status.st_dev, status.st_ino), path)
    return sorted(chosen.values())


def _local_versions(paths: list[str]) -> dict[str, dict]:
    versions = {}
    for path in paths:
        try:
            if os.path.isfile(path):
                versions[path] = file_version(path)
        except FileNotFoundError:  # gone since it was listed: as if not listed
            continue
    return versions


def holds_file(folder: str, name: str) -> bool:
    """Whether `folder` holds a file `name` now (a marker such as _SUCCESS)."""
    path = os.path.join(folder, name)
    if not is_url(folder):
        return os.path.isfile(local(path))
    fs = filesystem(folder)
    fs.invalidate_cache()
    try:
        return fs.isfile(path)
    except Exception as e:  # as _listing: the back-end's own errors too
        raise UserError(f"cannot list {path}: {error_line(e)}") from None


def dated_folders(root: str, since: datetime, hours: bool) -> list[tuple[datetime, str]]:
    """(time, folder) of the dated folders under `root` now, YYYY/MM/DD (with `hours`, YYYY/MM/DD/HH), of
    since's day or later, oldest first. Only the branches from since's day on are listed; names that are no
    such numbers (or no date) are passed over."""
    levels = 4 if hours else 3
    floor = folder_name(since, hours=False).split("/")
    found: list[tuple[datetime, str]] = []

    def walk(folder: str, names: list[str]) -> None:
        if len(names) == levels:
            when = _date_of(names)
            if when is not None:
                found.append((when, folder))
            return
        level = len(names)
        at_floor = level < 3 and names == floor[:level]
        for name in _subfolders(folder):
            if _dated_name(name, level) and not (at_floor and name < floor[level]):
                walk(os.path.join(folder, name), [*names, name])

    if is_url(root):
        filesystem(root).invalidate_cache()
    walk(root, [])
    return found


DATED_LEVELS = ("%Y", "%m", "%d", "%H")


def folder_name(when: datetime, hours: bool) -> str:
    """YYYY/MM/DD (with `hours`, YYYY/MM/DD/HH) of `when`; strftime's %Y drops a small year's leading 0s."""
    return f"{when.year:04d}/{when:%m/%d}" + (f"/{when:%H}" if hours else "")


def _dated_name(name: str, level: int) -> bool:
    """Whether a folder name can be the year (level 0), month, day or hour of a dated folder."""
    # isdigit() and strptime also take "\u0662", an Arabic-Indic 2
    return len(name) == (4 if level == 0 else 2) and name.isascii() and name.isdigit()


def _date_of(names: list[str]) -> datetime | None:
    """The time the folder names (year, month, day[, hour]) spell, or None: 2026/13/01 is no date."""
    try:
        return datetime.strptime("/".join(names), "/".join(DATED_LEVELS[: len(names)]))
    except ValueError:
        return None


def _subfolders(folder: str) -> list[str]:
    """The names of `folder`'s sub-folders, sorted (none when it is missing)."""
    if not is_url(folder):
        try:
            return sorted(entry.name for entry in os.scandir(local(folder)) if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
    fs = filesystem(folder)
    entries = _listing(lambda: fs.ls(folder, detail=True), folder)
    return sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry["type"] == "directory"
    )


def _listing(list_entries: Callable[[], Iterable[dict]], what: str) -> list[dict]:
    """A remote listing's entries: none where the folder is missing, one line for any other error (the
    back-end's own too: botocore's connection errors are no OSErrors)."""
    try:
        return list(list_entries())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except Exception as e:
        raise UserError(f"cannot list {what}: {error_line(e)}") from None


def _missing_bucket(url: str) -> str:
    """Why a URL matched nothing when its bucket (container) is not there, else ""."""
    if not is_url(url):
        return ""
    fs = filesystem(url)
    bucket = fs._strip_protocol(url).split("/", 1)[0]
    try:
        return "" if fs.exists(bucket) else f": the bucket {bucket!r} does not exist"
    except Exception as e:  # PermissionError and the like: the listing above said no more than this
        return f": {error_line(e)}"


def date_files(spec: ExplicitDateInputs, suffixes: tuple[str, ...] = (".gz",)) -> list[str]:
    """The files named *.gz (or another of `suffixes`) under data_root/YYYY/MM/DD for the `days` days ending
    at end_date (inclusive)."""
    end = dated_end(spec, suffixes)
    days = (end - timedelta(days=i) for i in range(spec.days))
    folders = [os.path.join(spec.data_root, folder_name(day, hours=False)) for day in days]
    return _folder_files(
        sorted(folders),
        spec.num_missing_days_tol,
        "day",
        "explicit_date_inputs.num_missing_days_tol",
        suffixes,
    )


def datetime_files(spec: ExplicitDatetimeInputs, suffixes: tuple[str, ...] = (".gz",)) -> list[str]:
    """The files named *.gz (or another of `suffixes`) under data_root/YYYY/MM/DD/HH, `hours` hours ending at
    end_datetime (inclusive)."""
    end = dated_end(spec, suffixes)
    folders = [
        os.path.join(spec.data_root, folder_name(end - timedelta(hours=i), hours=True))
        for i in range(spec.hours)
    ]
    return _folder_files(
        sorted(folders),
        spec.num_missing_hours_tol,
        "hour",
        "explicit_datetime_inputs.num_missing_hours_tol",
        suffixes,
    )


# Folders are named in UTC by convention, or in a local time at most 14 hours ahead of it.
FUTURE_SLACK = timedelta(days=1)


def dated_end(spec: ExplicitDateInputs | ExplicitDatetimeInputs, suffixes: tuple[str, ...]) -> datetime:
    """The day (hour) the folders end at: the configured one, or for `latest` the newest folder holding a
    data file now (newest_dated_folder), checked as the config checks a given end."""
    if not spec.latest:
        return spec.end.replace(minute=0)
    if isinstance(spec, ExplicitDatetimeInputs):
        field, layout, span = (
            "explicit_datetime_inputs.end_datetime",
            "%Y/%m/%d/%H",
            timedelta(hours=spec.hours - 1),
        )
    else:
        field, layout, span = "explicit_date_inputs.end_date", "%Y/%m/%d", timedelta(days=spec.days - 1)
    newest = newest_dated_folder(spec.data_root, isinstance(spec, ExplicitDatetimeInputs), suffixes)
    if newest is None:
        names = layout.replace("%Y", "YYYY").replace("%m", "MM").replace("%d", "DD").replace("%H", "HH")
        raise UserError(f"{field}: latest, but no {names} folder under {spec.data_root} holds a data file")
    end, folder = newest
    if end - datetime.min < span:
        raise UserError(f"{field}: latest is {folder}, and the folders before it reach before the year 1")
    log.info("%s: latest is %s", field, folder)
    if end - datetime.now(UTC).replace(tzinfo=None) > FUTURE_SLACK:
        log.warning("%s: latest is %s, more than a day after now (UTC): a misnamed folder?", field, folder)
    return end


def newest_dated_folder(root: str, hours: bool, suffixes: tuple[str, ...]) -> tuple[datetime, str] | None:
    """The (time, folder) of the newest dated folder under `root` (YYYY/MM/DD, with `hours` YYYY/MM/DD/HH)
    that holds a data file (named *SUFFIX) now, or None. Each level is listed newest name first and a branch
    without such a folder is passed over: a few listings for a year of folders, where dated_folders lists
    them all."""
    levels = 4 if hours else 3
    if is_url(root):
        filesystem(root).invalidate_cache()

    def newest(folder: str, names: list[str]) -> tuple[datetime, str] | None:
        if len(names) == levels:
            when = _date_of(names)
            return (when, folder) if when is not None and _data_files(folder, suffixes) else None
        for name in reversed(_subfolders(folder)):
            if _dated_name(name, len(names)):
                found = newest(os.path.join(folder, name), [*names, name])
                if found is not None:
                    return found
        return None

    return newest(root, [])


def _folder_files(
    folders: list[str], tolerance: int, unit: str, field: str, suffixes: tuple[str, ...]
) -> list[str]:
    """The data files (named *SUFFIX) of `folders`, sorted; a folder that is missing or holds none counts as
    missing."""
    files: list[str] = []
    missing: list[str] = []
    # The messages name the first suffix where they did before Parquet, and the others after.
    kind, others = suffixes[0], "".join(f" (nor {suffix} files)" for suffix in suffixes[1:])
    for folder in folders:
        found = _data_files(folder, suffixes)
        if not found:
            log.warning("no %s data files in %s (missing %s of data)%s", kind, folder, unit, others)
            missing.append(folder)
        files += found
    if len(missing) > tolerance:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"{len(missing)} of {len(folders)} {unit}s have no {kind} data files ({shown}); "
            f"{field} allows {tolerance}{others}"
        )
    if not files:
        raise UserError(f"no {kind} data files in {folders[0]} .. {folders[-1]}{others}")
    return sorted(files)


def _data_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    if is_url(folder):
        return _url_data_files(folder, suffixes)
    folder = local(folder)
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    paths = (os.path.join(folder, name) for name in names if name.lower().endswith(suffixes))
    return [p for p in paths if os.path.isfile(p)]


def _url_data_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    fs = filesystem(folder)
    entries = _listing(lambda: fs.ls(folder, detail=True), folder)
    return [
        fs.unstrip_protocol(entry["name"])
        for entry in entries
        if entry["type"] == "file" and entry["name"].lower().endswith(suffixes)
    ]
