"""Following files (training.follow): new files of an inputs glob and new dated folders are read once each, in
arrival order, and a position (records per file, done, version) resumes exactly. Real files on disk, and an
s3:// prefix on moto's S3 server on loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from heavyranker.config import load_config
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.sources.follow import checkpoint_position, follow_sources, restore_position
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.errors import UserError
from tests.conftest import CONFIGS
from tests.data.test_storage import moto_server, s3_endpoint
from tests.kafka_data import example

BATCH = 4


def write_file(path: Path, ids: range) -> None:
    os.makedirs(path.parent, exist_ok=True)
    write_records(str(path), [example(i) for i in ids])


def hour(root: Path, when: str, first: int, per_file: int = 4, files: int = 2) -> Path:
    """Folder root/<when> with `files` files of per_file records, ids first, first+1, ... in file order."""
    folder = root / when
    for k in range(files):
        write_file(folder / f"part-{k}.gz", range(first + k * per_file, first + (k + 1) * per_file))
    return folder


def config(*overrides: str):
    return load_config(
        CONFIGS / "local_small.yaml",
        [
            "validation_data={}",
            f"train_data.global_batch_size={BATCH}",
            "train_data.follow_poll_seconds=0.1",
            *overrides,
        ],
    )


def hours_config(root: Path | str, *overrides: str, end: str = "2026-01-01T00", hours: int = 1):
    dated = f"{{data_root: '{root}', end_datetime: '{end}', hours: {hours}}}"
    return config("train_data.inputs=null", f"train_data.explicit_datetime_inputs={dated}", *overrides)


def follow(cfg, **kwargs) -> RecapDataset:
    return RecapDataset(cfg.train_data, follow=True, where="train_data", **kwargs)


def take(data: RecapDataset, batches: Iterator, n: int) -> list[int]:
    """The ids of the next n batches; those not there within 60 s are left out (a bound on a hang: the count
    then falls short and the test fails)."""
    taken = [next(batches) for _ in range(n) if data.ready(60)]
    return [int(i) for b in taken for i in b.features["meta__tweet_id"].reshape(-1).tolist()]


def test_dated_folders_are_read_once_complete_in_time_order_past_the_end(tmp_path):
    hour(tmp_path, "2025/12/31/23", 1000)  # before the configured first hour: never read
    hour(tmp_path, "2026/01/01/00", 0)
    hour(tmp_path, "2026/01/01/01", 8)
    with follow(hours_config(tmp_path)) as data:
        batches = iter(data)
        assert take(data, batches, 2) == list(range(8))  # 00 is complete: 01 is there
        hour(tmp_path, "2026/01/01/02", 16)  # completes 01 (and the end of the configured hours is behind)
        assert take(data, batches, 2) == list(range(8, 16))
        hour(tmp_path, "2026/01/02/00", 24)  # the next day: completes 02
        assert take(data, batches, 2) == list(range(16, 24))
        assert data.stream.newest == "2026-01-01 02:00"
        position = data.position()
    hour_02 = tmp_path / "2026/01/01/02"
    assert {path: entry["next"] for path, entry in position.items()} == {
        str(folder / f"part-{k}.gz"): 4
        for folder in (tmp_path / "2026/01/01/00", tmp_path / "2026/01/01/01", hour_02)
        for k in (0, 1)
    }
    assert all(entry["done"] for entry in position.values())
    stat = os.stat(hour_02 / "part-1.gz")
    assert position[str(hour_02 / "part-1.gz")]["version"] == {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def test_marker_mode_reads_a_folder_once_its_marker_is_there(tmp_path):
    hour(tmp_path, "2026/01/01/00", 0)
    hour(tmp_path, "2026/01/01/01", 8)
    (tmp_path / "2026/01/01/01/_DONE").touch()
    cfg = hours_config(tmp_path, "train_data.follow_complete=marker", "train_data.follow_marker=_DONE")
    with follow(cfg) as data:
        batches = iter(data)
        assert take(data, batches, 2) == list(range(8, 16))  # 01 has its marker, 00 not yet
        (tmp_path / "2026/01/01/00/_DONE").touch()
        assert take(data, batches, 2) == list(range(8))


def test_a_glob_takes_each_listings_new_files_sorted(tmp_path):
    write_file(tmp_path / "c.gz", range(0, 4))
    write_file(tmp_path / "a.gz", range(4, 8))
    with follow(config(f"train_data.inputs={tmp_path}/*.gz")) as data:
        batches = iter(data)
        assert take(data, batches, 2) == [*range(4, 8), *range(0, 4)]  # a.gz, then c.gz
        write_file(tmp_path / "b.gz", range(8, 12))  # after c.gz: it came later
        assert take(data, batches, 1) == list(range(8, 12))
        assert data.stream.newest == str(tmp_path / "c.gz")


def test_the_start_line_says_what_is_followed(tmp_path, caplog):
    # Was "train_data: 0 files for rank 0 of 1, ... (shuffle=True, repeat=True, drop_last=True)": the
    # settings of a file list that a followed glob does not have.
    with caplog.at_level(logging.INFO, logger="heavyranker.data.dataset"):
        follow(config(f"train_data.inputs={tmp_path}/*.gz")).close()
    assert caplog.messages == [
        f"train_data: inputs {tmp_path}/*.gz, as it arrives, in arrival order, for rank 0 of 1, "
        f"batches of {BATCH} examples"
    ]


def test_a_position_resumes_mid_file_and_skips_done_files(tmp_path):
    write_file(tmp_path / "a.gz", range(0, 6))
    write_file(tmp_path / "b.gz", range(6, 12))
    cfg = config(f"train_data.inputs={tmp_path}/*.gz")
    with follow(cfg) as data:
        assert take(data, iter(data), 2) == list(range(8))
        position = data.position()
    assert {Path(p).name: (e["next"], e["done"]) for p, e in position.items()} == {
        "a.gz": (6, True),
        "b.gz": (2, False),
    }
    write_file(tmp_path / "c.gz", range(12, 16))
    with follow(cfg) as data:
        data.resume(position)
        assert take(data, iter(data), 2) == list(range(8, 16))


def test_a_file_changed_after_it_was_partly_trained_is_not_read_on(tmp_path, caplog):
    write_file(tmp_path / "a.gz", range(0, 6))
    cfg = config(f"train_data.inputs={tmp_path}/*.gz")
    with follow(cfg) as data:
        assert take(data, iter(data), 1) == list(range(4))
        position = data.position()
    write_file(tmp_path / "a.gz", range(100, 110))  # rewritten in place: another size
    write_file(tmp_path / "b.gz", range(6, 10))
    with follow(cfg) as data, caplog.at_level(logging.WARNING):
        data.resume(position)
        assert take(data, iter(data), 1) == list(range(6, 10))
    [warning] = [r.getMessage() for r in caplog.records if "changed after" in r.getMessage()]
    assert f"{tmp_path}/a.gz changed after 4 of its records were trained on" in warning
    assert "\n" not in warning


def test_a_file_rewritten_after_it_was_read_is_not_read_again(tmp_path, caplog):
    write_file(tmp_path / "a.gz", range(0, 4))
    with follow(config(f"train_data.inputs={tmp_path}/*.gz")) as data, caplog.at_level(logging.WARNING):
        batches = iter(data)
        assert take(data, batches, 1) == list(range(4))
        write_file(tmp_path / "a.gz", range(100, 108))
        write_file(tmp_path / "b.gz", range(4, 8))
        assert take(data, batches, 1) == list(range(4, 8))
        write_file(tmp_path / "c.gz", range(8, 12))
        assert take(data, batches, 1) == list(range(8, 12))
    rewritten = [r.getMessage() for r in caplog.records if "rewritten" in r.getMessage()]
    assert len(rewritten) == 1  # warned once
    assert f"{tmp_path}/a.gz was rewritten after it was read" in rewritten[0]


def test_a_folder_that_disappears_is_one_warning_and_nothing_trained_is_lost(tmp_path, caplog):
    hour(tmp_path, "2026/01/01/00", 0)
    hour(tmp_path, "2026/01/01/01", 8)
    with follow(hours_config(tmp_path)) as data, caplog.at_level(logging.WARNING):
        batches = iter(data)
        assert take(data, batches, 2) == list(range(8))
        shutil.rmtree(tmp_path / "2026/01/01/01")  # listed, not complete yet: gone
        hour(tmp_path, "2026/01/01/02", 16)
        hour(tmp_path, "2026/01/01/03", 24)
        assert take(data, batches, 2) == list(range(16, 24))
        position = data.position()
    [gone] = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    folder = tmp_path / "2026/01/01/01"
    assert gone == f"train_data: the dated folder {folder} is gone; its files not read by then are left out"
    assert sorted(Path(p).parent.name for p in position) == ["00", "00", "02", "02"]


def test_ranks_take_disjoint_shares_of_new_files(tmp_path):
    hour(tmp_path, "2026/01/01/00", 0, per_file=4, files=4)
    hour(tmp_path, "2026/01/01/01", 16)
    cfg = hours_config(tmp_path, f"train_data.global_batch_size={2 * BATCH}")
    with follow(cfg, rank=0, world_size=2) as first, follow(cfg, rank=1, world_size=2) as second:
        assert take(first, iter(first), 2) == [*range(0, 4), *range(8, 12)]  # files 0 and 2 of the folder
        assert take(second, iter(second), 2) == [*range(4, 8), *range(12, 16)]  # files 1 and 3
    # A glob's files go by the crc32 of their path (the rule the docs give), in each rank's own order.
    paths = [tmp_path / f"g{k}.gz" for k in range(6)]
    for k, path in enumerate(paths):
        write_file(path, range(100 + 4 * k, 104 + 4 * k))
    cfg = config(f"train_data.inputs={tmp_path}/g*.gz", f"train_data.global_batch_size={2 * BATCH}")
    for rank in (0, 1):
        mine = [k for k, path in enumerate(paths) if zlib.crc32(str(path).encode()) % 2 == rank]
        with follow(cfg, rank=rank, world_size=2) as data:
            assert take(data, iter(data), len(mine)) == [
                i for k in mine for i in range(100 + 4 * k, 104 + 4 * k)
            ]


def test_a_position_of_two_ranks_is_read_on_by_any_number_of_ranks(tmp_path):
    """A restart with another --nproc: the position of 2 ranks, mid-file on both, read on by 1 rank and by 4
    ranks, whichever rank now takes each file (crc32 of its path modulo the ranks): each rank reads the rest
    of its files, and with the first run's records that is every record of the glob exactly once."""
    paths = [tmp_path / f"p{k}.gz" for k in range(6)]
    for k, path in enumerate(paths):
        write_file(path, range(10 * k, 10 * k + 6))
    glob = f"train_data.inputs={tmp_path}/*.gz"
    first, position = [], {}
    for rank in (0, 1):
        with follow(config(glob, "train_data.global_batch_size=8"), rank=rank, world_size=2) as data:
            first += take(data, iter(data), 1)
            position |= data.position()
    assert not all(entry["done"] for entry in position.values())  # a file partly read
    left = {path: 6 - position.get(str(path), {"next": 0})["next"] for path in paths}  # records not read
    for world in (1, 4):  # batches of 1 record a rank: no short last batch is left unread
        read = list(first)
        for rank in range(world):
            share = sum(n for path, n in left.items() if zlib.crc32(str(path).encode()) % world == rank)
            with follow(
                config(glob, f"train_data.global_batch_size={world}"), rank=rank, world_size=world
            ) as data:
                data.resume(position)
                read += take(data, iter(data), share)
        assert sorted(read) == [i for k in range(6) for i in range(10 * k, 10 * k + 6)], world


@contextlib.contextmanager
def moto_bucket() -> Iterator[fsspec.AbstractFileSystem]:
    with moto_server() as url, s3_endpoint(url):
        fs = fsspec.filesystem("s3")
        fs.mkdir("follow")
        yield fs


def upload(s3: fsspec.AbstractFileSystem, tmp_path: Path, url: str, ids: range) -> None:
    """A file of `ids` at `url`, written locally first: an object appears whole, as a rename makes a file."""
    write_file(tmp_path / "upload.gz", ids)
    s3.put(str(tmp_path / "upload.gz"), url)


def test_dated_folders_under_an_s3_prefix(tmp_path):
    with moto_bucket() as s3:
        root = "s3://follow/hours"
        for when, first in (("2026/01/01/00", 0), ("2026/01/01/01", 8)):
            upload(s3, tmp_path, f"{root}/{when}/part-0.gz", range(first, first + 8))
        with follow(hours_config(root)) as data:
            batches = iter(data)
            assert take(data, batches, 2) == list(range(8))
            upload(s3, tmp_path, f"{root}/2026/01/01/02/part-0.gz", range(16, 24))
            assert take(data, batches, 2) == list(range(8, 16))
            position = data.position()
        version = position[f"{root}/2026/01/01/01/part-0.gz"]["version"]
        assert version["ETag"] == str(s3.info("follow/hours/2026/01/01/01/part-0.gz")["ETag"])
        assert position[f"{root}/2026/01/01/01/part-0.gz"]["next"] == 8


def test_follow_refuses_the_decoded_cache_in_one_line(tmp_path):
    cfg = config(f"train_data.inputs={tmp_path}/*.gz", "train_data.cache=true", "training.follow=true")
    with pytest.raises(UserError, match=r"^training.follow .*cache: true.*set cache: false$"):
        follow_sources(cfg)


def test_a_checkpoint_of_another_source_starts_from_the_start(tmp_path, caplog):
    glob, dated = config(f"train_data.inputs={tmp_path}/*.gz"), hours_config(tmp_path / "h")
    position = {"x.gz": {"next": 1, "done": False, "version": {}}}
    state = {"data_position": checkpoint_position(glob.train_data, position, follow=True)}
    assert restore_position(state, glob.train_data) == position
    assert checkpoint_position(glob.train_data, position, follow=False) is None  # a fixed set: the step says
    with caplog.at_level(logging.WARNING):
        assert restore_position(state, dated.train_data) == {}
    assert f"holds the position of inputs {tmp_path}/*.gz, not of dated folders {tmp_path}/h" in caplog.text
