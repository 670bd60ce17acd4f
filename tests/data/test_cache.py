"""`cache: true`: the decoded cache gives the batches uncached reading gives (the reference: uncached reading,
whose values test_dataset.py checks against the examples' own ids), later reads decode nothing, resume
positions identically, a changed input or config is not served from a stale entry, a half-written entry is
never read, damage is counted as uncached, and the `data cache` command reports and clears."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from itertools import islice
from pathlib import Path

import pytest
import torch

from heavyranker.cli import main
from heavyranker.config.data import DataConfig
from heavyranker.data import cache as cache_module
from heavyranker.data.batch import Batch
from heavyranker.data.cache_entry import TEMPORARY, Fingerprint
from heavyranker.data.cache_files import mark, state
from heavyranker.data.columns import Columns
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import DataError
from tests.conftest import CONFIGS, SMALL_SPLITS
from tests.data.test_dataset import TRAINING, batch_ids, data_config, example, write_files

PREPROCESS = {  # every preprocessor: those the cache applies, and downsampling, applied per batch
    "downsample_negatives": {"batch_multiplier": 2, "engagements_list": ["a"]},
    "truncate_and_slice": {"continuous_feature_truncation": 4},
    "downcast": {"features": {"continuous": "bfloat16", "binary": "bool"}},
    "rectify_labels": {
        "label_rectification_window_in_hours": 1.0,
        "served_timestamp_field": "ts.served",
        "impressed_timestamp_field": "ts.impressed",
        "label_to_engaged_timestamp_field": {"a": "ts.engaged_a"},
    },
    "extract_features": {
        "extract_feature_table": [{"name": "c2", "source_tensor": "continuous", "index": 2}]
    },
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    write_files(data, [10, 6, 3])
    return data


def cached(folder: Path, workers: int = 1, **fields) -> DataConfig:
    cache = str(folder.parent / "cache")
    return data_config(folder, cache=True, cache_dir=cache, cache_workers=workers, **fields)


def read(data: DataConfig, batches: int | None = None, skip: int = 0, **reading) -> list[Batch]:
    with RecapDataset(data, seed=5, **reading) as dataset:
        dataset.skip_to(skip)
        return list(islice(dataset, batches))


def assert_same(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.features.keys() == b.features.keys() and a.tasks == b.tasks
        for name in a.features:
            assert a.features[name].dtype == b.features[name].dtype, name
            assert torch.equal(a.features[name], b.features[name]), name
        assert torch.equal(a.labels, b.labels) and torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("reading", [TRAINING, {}], ids=["training", "evaluation"])
@pytest.mark.parametrize("preprocess", [None, PREPROCESS], ids=["plain", "every-preprocessor"])
def test_cached_batches_are_the_uncached_ones(folder, reading, preprocess):
    batches = 12 if reading else None  # training: more than two passes over the 19 examples
    uncached = read(data_config(folder, preprocess=preprocess), batches, **reading)
    first = read(cached(folder, preprocess=preprocess), batches, **reading)  # builds the cache
    again = read(cached(folder, preprocess=preprocess), batches, **reading)  # reads it
    assert_same(first, uncached)
    assert_same(again, uncached)
    assert len(uncached) >= 3 and any(b.weights.max() > 1 for b in uncached) == (preprocess is not None)


def test_a_later_run_decodes_nothing(folder, monkeypatch, caplog):
    want = batch_ids(RecapDataset(cached(folder)))

    def no_decoding(*args):
        raise AssertionError("decoded a record")

    monkeypatch.setattr(Columns, "decode", no_decoding)
    caplog.set_level("INFO")
    assert batch_ids(RecapDataset(cached(folder))) == want
    assert "reading the decoded cache in" in caplog.text and "3 of 3 files cached" in caplog.text


@pytest.mark.parametrize("reading", [TRAINING, {}], ids=["training", "evaluation"])
def test_resume_positions_as_uncached(folder, reading):
    fresh = read(data_config(folder), 6, **reading)
    for k in (0, 3, 5):
        assert_same(read(cached(folder), 1, skip=k, **reading), fresh[k : k + 1])


def test_processes_build_the_same_entries(folder):
    uncached = read(data_config(folder, preprocess=PREPROCESS), 8, **TRAINING)
    assert_same(read(cached(folder, workers=2, preprocess=PREPROCESS), 8, **TRAINING), uncached)
    assert len(list((folder.parent / "cache").iterdir())) == 3


def test_entries_are_mapped_while_read_not_for_the_whole_split(tmp_path, monkeypatch):
    """Each entry is a mapping per column and the kernel caps a process's mappings (vm.max_map_count, about
    65,000): a split of many files must not keep every entry mapped, only the last MAPPED_ENTRIES."""
    monkeypatch.setattr(cache_module, "MAPPED_ENTRIES", 2)
    data_folder = tmp_path / "many"
    data_folder.mkdir()
    write_files(data_folder, [3] * 24)
    data = cached(data_folder)
    read(data)  # builds every entry

    def mapped_entries() -> int:
        maps = Path("/proc/self/maps").read_text().splitlines()
        return len({Path(line.split()[-1]).parent for line in maps if str(data.cache_dir) in line})

    most = 0
    with RecapDataset(data, seed=5, shuffle=False, repeat=False) as dataset:
        for _ in dataset:
            most = max(most, mapped_entries())
    # Two files are read at a time (file_batch_size); the threads open the next pair ahead, and batches queued
    # ahead still hold earlier rows (4 or 5 in 30 runs): a few pairs, against all 24 when each stayed mapped.
    assert 0 < most <= 8


def test_a_changed_file_is_read_again(folder):
    assert batch_ids(RecapDataset(cached(folder)))[0] == [0, 1, 2, 3]
    write_files(folder, [10])  # part-0 now ids 0..9 again, but rewritten: a new mtime ...
    ids = batch_ids(RecapDataset(cached(folder)))
    assert sorted(sum(ids, [])) == list(range(19))
    write_files(folder, [11])  # ... and here different records
    ids = batch_ids(RecapDataset(cached(folder)))
    assert sorted(sum(ids, [])) == [*range(11), *range(10, 19)]


def test_a_changed_config_gets_new_entries(folder):
    entries = folder.parent / "cache"
    list(RecapDataset(cached(folder)))
    list(RecapDataset(cached(folder, global_batch_size=2, file_batch_size=1)))  # reading only: same entries
    assert len(list(entries.iterdir())) == 3
    truncated = read(cached(folder, preprocess={"truncate_and_slice": {"continuous_feature_truncation": 2}}))
    assert truncated[0].features["continuous"].shape == (4, 2) and len(list(entries.iterdir())) == 6
    list(RecapDataset(cached(folder), require_labels=False))  # prediction reads no labels: its own entries
    assert len(list(entries.iterdir())) == 9


def test_a_half_written_entry_is_never_read(folder):
    want = read(data_config(folder))
    read(cached(folder))
    entries = sorted((folder.parent / "cache").iterdir())
    column = entries[0] / "column-0.bin"
    column.write_bytes(column.read_bytes()[:-8])  # as a run killed while writing it would leave it
    (folder.parent / "cache" / f"{TEMPORARY}x-1-y").mkdir()  # a killed build's folder: ignored
    assert_same(read(cached(folder)), want)


def test_damage_is_counted_as_uncached_and_raised_without_ignore(folder):
    write_files(folder, [10], {4: b"not a tf.Example"})
    part1 = folder / "part-1.gz"
    part1.write_bytes(part1.read_bytes()[:-30])  # a file cut short
    uncached = RecapDataset(data_config(folder, ignore_data_errors=True))
    want = read(data_config(folder, ignore_data_errors=True))
    list(uncached)
    for _ in range(2):  # building the cache, then reading it
        dataset = RecapDataset(cached(folder, ignore_data_errors=True))
        assert_same(list(dataset), want)
        assert dataset.counts() == uncached.counts() and dataset.damaged_files == [str(part1)]
        assert dataset.counts()["skipped_records"] == 1
    with pytest.raises(DataError, match=r"part-0\.gz: record 4: not a tf\.Example"):
        list(RecapDataset(cached(folder)))


def test_counts_defaults_filled_as_uncached(folder):
    write_files(folder, [10], {2: encode_example({k: v for k, v in example(2).items() if k != "disc"})})
    want = RecapDataset(data_config(folder))
    list(want)
    for _ in range(2):
        dataset = RecapDataset(cached(folder))
        list(dataset)
        assert dataset.counts() == want.counts() and dataset.counts()["defaults_filled/disc"] == 1


def test_the_cache_must_be_local(folder):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="the cache is memory-mapped, so it must be on local disk"):
        data_config(folder, cache=True, cache_dir="s3://bucket/cache")


def cache_command_args(small_data: Path, small_config_path: Path, cache: Path) -> list[str]:
    """The small config with its training data cached in `cache`, for `data cache` and `data dump`."""
    args = ["--config", str(small_config_path), "--set", f"train_data.inputs={small_data}/train/*.gz"]
    args += [f"--set=validation_data.{split}.inputs={small_data}/{split}/*.gz" for split in SMALL_SPLITS]
    args += [f"--set=train_data.cache_dir={cache}", "--set=train_data.cache=true"]
    return args + ["--set=train_data.cache_workers=1"]


def test_data_cache_command_reports_and_clears(small_data, small_config_path, tmp_path, capsys):
    cache = tmp_path / "c"
    args = cache_command_args(small_data, small_config_path, cache)
    assert main(["data", "cache", *args]) == 0
    assert f"{cache}: 0 entries, 0.0 MiB" in capsys.readouterr().out
    assert main(["data", "dump", *args, "--batches", "1", "--out", str(tmp_path / "d.npz")]) == 0
    capsys.readouterr()
    assert main(["data", "cache", *args]) == 0
    out = capsys.readouterr().out
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    assert f"{cache}: 4 entries, {size / 2**20:,.1f} MiB" in out and "train_data: 4 of 4 files cached" in out
    assert f"validation_data.{SMALL_SPLITS[0]}: 0 of 4 files cached (cache: false)" in out
    # What a killed run left is reported and cleared; what is not the cache's is neither.
    leftover = cache / f"{TEMPORARY}{'a' * 40}-123-0123abcd"
    leftover.mkdir()
    mark(leftover)  # a build's first step
    (leftover / "column-0.bin").write_bytes(b"x" * 2**20)
    (cache / "notes.txt").write_text("mine")
    (cache / "mine").mkdir()
    (cache / "mine" / "a.bin").write_bytes(b"y")
    assert main(["data", "cache", *args]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: 4 entries, {size / 2**20:,.1f} MiB; 1.0 MiB left by killed runs" in out
    assert main(["data", "cache", *args, "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: removed 4 entries, {(size + 2**20) / 2**20:,.1f} MiB; left alone 2 other files" in out
    assert sorted(os.listdir(cache)) == ["mine", "notes.txt"]
    assert (cache / "mine" / "a.bin").read_bytes() == b"y"


UNGUARDED_SCRIPT = """
import sys
from heavyranker.config import load_config
from heavyranker.data.dataset import RecapDataset

config = load_config(sys.argv[1], sys.argv[2:])
with RecapDataset(config.train_data) as dataset:
    next(iter(dataset))
"""


def test_a_script_without_a_main_guard_gets_an_error_not_an_endless_restart(small_data, tmp_path):
    """Every build process runs an unguarded script again, which fails starting processes of its own:
    multiprocessing.Pool replaced such workers forever, so the script hung printing tracebacks."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"train_data.cache_dir={tmp_path / 'c'}"]
    sets += ["train_data.cache=true", "train_data.cache_workers=2"]
    config = CONFIGS / "local_small.yaml"
    run = subprocess.run(
        [sys.executable, str(script), str(config), *sets], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    # The script's traceback ends with the error; the resource tracker may warn after it about the
    # semaphores of the processes that died.
    errors = [line for line in run.stderr.splitlines() if line.startswith("heavyranker.errors.")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith("heavyranker.errors.UserError: data: a process building the decoded cache")
    assert "`if __name__ == '__main__':`" in errors[0]


def entry_of(data: DataConfig, path: Path) -> Path:
    return Path(data.cache_dir) / Fingerprint(data, labels=True).key(str(path))


def overwrite(entry: Path, name: str, values: list[float], forge_checksum: bool) -> None:
    """Rewrites the first values of a float32 column of an entry in place (same size); with
    `forge_checksum`, the manifest's checksum too, as someone who knows the format would."""
    manifest = json.loads((entry / "manifest.json").read_text())
    column = next(c for c in manifest["columns"] if c["name"] == name)
    file = entry / column["file"]
    raw = bytearray(file.read_bytes())
    raw[: 4 * len(values)] = struct.pack(f"<{len(values)}f", *values)
    file.write_bytes(raw)
    if forge_checksum:
        column["crc32"] = zlib.crc32(bytes(raw))
        (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("forge_checksum", [False, True], ids=["bytes", "bytes-and-checksum"])
@pytest.mark.parametrize("column, what", [("labels", "label"), ("features/binary", "flag")])
def test_an_entry_changed_in_place_is_built_again_not_read(folder, caplog, forge_checksum, column, what):
    want = read(data_config(folder))
    data = cached(folder)
    read(data)
    entry = entry_of(data, folder / "part-0.gz")
    overwrite(entry, column, [2.0, 7.5e29], forge_checksum)
    caplog.set_level("WARNING")
    assert_same(read(data), want)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    reason = f"a {what} other than 0 or 1" if forge_checksum else f"changed on disk: column {column} fails"
    assert len(warnings) == 1 and str(entry) in warnings[0] and reason in warnings[0], warnings
    caplog.clear()
    assert_same(read(data), want)  # built again: read as it is
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_clear_removes_only_what_is_marked_ours(small_data, small_config_path, tmp_path, capsys):
    """A folder named like a key (a git commit's SHA), one named like a build, and an entry of the format
    before the marker: none is marked as ours, so none is removed, whatever its name."""
    cache = tmp_path / "c"
    args = cache_command_args(small_data, small_config_path, cache)
    assert main(["data", "dump", *args, "--batches", "1", "--out", str(tmp_path / "d.npz")]) == 0
    entries = sorted(cache.iterdir())
    sha = cache / ("0123456789abcdef" * 3)[:40]
    sha.mkdir()
    (sha / "HEAD").write_text("ref: refs/heads/main")
    (cache / f"{TEMPORARY}{'b' * 40}-123-0123abcd").mkdir()
    old = cache / ("c" * 40)
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": 1, "source": "x", "records": 0, "columns": []}))
    capsys.readouterr()
    assert main(["data", "cache", *args, "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: removed {len(entries)} entries" in out and "left alone 3 other files and folders" in out
    assert sorted(os.listdir(cache)) == sorted([sha.name, old.name, f"{TEMPORARY}{'b' * 40}-123-0123abcd"])
    assert (sha / "HEAD").read_text() == "ref: refs/heads/main"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_link_in_an_entry_s_place_is_left_alone_and_never_followed(folder, tmp_path, caplog, workers):
    want = read(data_config(folder))
    data = cached(folder, workers=workers)
    Path(data.cache_dir).mkdir()
    dangling, target = entry_of(data, folder / "part-0.gz"), tmp_path / "elsewhere"
    dangling.symlink_to(target)  # as a reader in another process could leave it
    file_link, victim = entry_of(data, folder / "part-1.gz"), tmp_path / "victim"
    victim.write_text("not the cache's")
    file_link.symlink_to(victim)
    caplog.set_level("WARNING")
    for _ in range(2):
        assert_same(read(data), want)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4 and all("left alone" in w for w in warnings), warnings  # each link, each run
    assert os.readlink(dangling) == str(target) and not target.exists()
    assert os.readlink(file_link) == str(victim) and victim.read_text() == "not the cache's"
    assert len(os.listdir(data.cache_dir)) == 3  # the third file's entry, and no temporary left


def test_a_link_in_place_of_a_column_file_is_refused_and_the_entry_built_again(folder, tmp_path, caplog):
    want = read(data_config(folder))
    data = cached(folder)
    read(data)
    entry = entry_of(data, folder / "part-0.gz")
    column, copy = entry / "column-0.bin", tmp_path / "copy.bin"
    copy.write_bytes(column.read_bytes())  # the same bytes: its checksum alone would pass them
    column.unlink()
    column.symlink_to(copy)
    caplog.set_level("WARNING")
    assert_same(read(data), want)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "(ELOOP)" in warnings[0], warnings
    assert not column.is_symlink() and copy.read_bytes() == column.read_bytes()


def test_a_link_swapped_in_after_the_check_is_not_followed(folder, tmp_path, monkeypatch, caplog):
    """The race: the entry's folder is checked (a folder of ours), then replaced by a link to it before its
    files are opened. The open refuses the link: the check and the use are one step."""
    want = read(data_config(folder))
    data = cached(folder)
    read(data)
    entry, moved = entry_of(data, folder / "part-0.gz"), tmp_path / "moved"

    def state_then_swap(path: Path):
        found = state(path)
        if path == entry and not entry.is_symlink():
            entry.rename(moved)
            entry.symlink_to(moved)
        return found

    monkeypatch.setattr(cache_module, "state", state_then_swap)
    caplog.set_level("INFO")
    assert_same(read(data), want)
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 of 3 files cached, decoding 1 into it" in m for m in messages), messages  # not 3 of 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{entry}, the cache entry of" in warnings[0], warnings
    assert "left alone" in warnings[0] and os.readlink(entry) == str(moved)
    assert state(moved) == "entry"  # the link's target is untouched


def test_clear_reports_links_and_follows_none(small_data, small_config_path, tmp_path, capsys):
    cache = tmp_path / "c"
    args = cache_command_args(small_data, small_config_path, cache)
    cache.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mark(elsewhere)  # even a link to what looks like one of ours is not ours
    (cache / ("d" * 40)).symlink_to(elsewhere)
    (cache / ("e" * 40)).symlink_to(tmp_path / "gone")
    assert main(["data", "cache", *args, "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"{cache}: removed 0 entries, 0.0 MiB; left alone the links {'d' * 40}, {'e' * 40}" in out
    assert sorted(os.listdir(cache)) == ["d" * 40, "e" * 40] and elsewhere.is_dir()


FULL_DISK_SCRIPT = """
import resource, sys
from heavyranker.config import load_config
from heavyranker.data.dataset import RecapDataset

if __name__ == "__main__":
    if sys.argv[1] == "rlimit":  # files written beyond 64 KiB fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    config = load_config(sys.argv[2], sys.argv[3:])
    with RecapDataset(config.train_data) as dataset:
        next(iter(dataset))
"""


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit"])
def test_a_full_disk_says_the_os_error(small_data, tmp_path, limit):
    """A real limit, not a mock: a 64 KiB tmpfs (root only) or RLIMIT_FSIZE, in a process of its own."""
    cache = tmp_path / "c"
    cache.mkdir()
    if limit == "tmpfs":
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)], capture_output=True
        )
        if mount.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    script = tmp_path / "fill.py"
    script.write_text(FULL_DISK_SCRIPT)
    sets = [f"train_data.inputs={small_data}/train/*.gz", f"train_data.cache_dir={cache}"]
    sets += ["train_data.cache=true", "train_data.cache_workers=1"]
    try:
        run = subprocess.run(
            [sys.executable, str(script), limit, str(CONFIGS / "local_small.yaml"), *sets],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if limit == "tmpfs":
            subprocess.run(["umount", str(cache)], check=True)
    reason = "No space left on device (ENOSPC)" if limit == "tmpfs" else "File too large (EFBIG)"
    error = run.stderr.strip().splitlines()[-1]
    assert error.startswith("heavyranker.errors.UserError: cache: cannot write ") and error.endswith(reason)
