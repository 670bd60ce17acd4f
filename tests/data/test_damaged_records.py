"""Damaged records and labels other than 0 or 1: an error naming file and record, or with ignore_data_errors
left out of their batch, counted and logged; and the counts a dataset reports, and `data dump` and `data
stats` log.

Most files are those of test_dataset.py (ids 0-9, 10-15, 16-18), some records replaced by damaged ones;
write_small_records writes records for configs/local_small.yaml, for the commands."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from heavyranker.config import load_config
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.dump import dump_batches
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.stats import write_feature_stats
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import DataError
from heavyranker.schema import load_schema
from tests.conftest import CONFIGS
from tests.data.test_dataset import TRAINING, batch_ids, data_config, example, write_files

SIZES = [10, 6, 3]
TASKS = {"a": {}, "b": {}, "f": {}}  # f: a label stored as a float
DAMAGE = {  # kind -> (the damaged record of id i, what the error says about it)
    "not a tf.Example": (lambda i: b"not a tf.Example", r"not a tf\.Example: wire type 6"),
    "wrong length": (
        lambda i: encode_example({**example(i), "cont": np.zeros(5, dtype=np.float32)}),
        r"feature cont: 5 values, the schema says 6",
    ),
    "wrong type": (
        lambda i: encode_example({**example(i), "disc": np.zeros(3, dtype=np.float32)}),
        r"feature disc holds a float_list, the schema says int64_list",
    ),
    "label 2": (lambda i: encode_example({**example(i), "a": [2]}), r"label a is 2, not 0 or 1"),
    "label -1": (lambda i: encode_example({**example(i), "b": [-1]}), r"label b is -1, not 0 or 1"),
    "float label 0.5": (
        lambda i: encode_example({**example(i), "f": np.array([0.5], dtype=np.float32)}),
        r"label f is 0\.5, not 0 or 1",
    ),
    "float label NaN": (
        lambda i: encode_example({**example(i), "f": np.array([np.nan], dtype=np.float32)}),
        r"label f is nan, not 0 or 1",
    ),
    # Flags are 0/1 as labels are; as a float32 input, 2**62 would be 4.6e18.
    "flag 2**62": (
        lambda i: encode_example({**example(i), "bin": np.array([0, 1, 2**62, 0])}),
        r"feature binary \(bin\) column 2 is 4611686018427387904, not 0 or 1",
    ),
    "flag -1": (
        lambda i: encode_example({**example(i), "bin": np.array([-1, 1, 0, 0])}),
        r"feature binary \(bin\) column 0 is -1, not 0 or 1",
    ),
}


def damaged(folder: Path, ids: dict[int, str], **fields):
    """The data config over SIZES files whose record of id i is damaged as ids[i] says."""
    write_files(folder, SIZES, {i: DAMAGE[kind][0](i) for i, kind in ids.items()})
    return data_config(folder, tasks=TASKS, **fields)


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_record_stops_the_read_naming_file_and_record(tmp_path, kind):
    data = damaged(tmp_path, {3: kind, 12: kind})
    with pytest.raises(DataError, match=rf"part-0\.gz: record 3: {DAMAGE[kind][1]}"):
        list(RecapDataset(data))


@pytest.mark.parametrize("kind", ["flag 2**62", "label 2"])
def test_the_cache_refuses_what_the_uncached_read_refuses(tmp_path, kind):
    cached = {"cache": True, "cache_dir": str(tmp_path / "cache"), "cache_workers": 1}
    with pytest.raises(DataError, match=rf"part-0\.gz: record 3: {DAMAGE[kind][1]}"):
        list(RecapDataset(damaged(tmp_path, {3: kind}, **cached)))
    dataset = RecapDataset(damaged(tmp_path, {3: kind}, ignore_data_errors=True, **cached))
    assert 3 not in sum(batch_ids(dataset), []) and dataset.counts()["skipped_records"] == 1


@pytest.mark.parametrize("kind", DAMAGE)
def test_ignore_data_errors_leaves_damaged_records_out_of_their_batch(tmp_path, kind):
    dataset = RecapDataset(damaged(tmp_path, {3: kind, 12: kind, 17: kind}, ignore_data_errors=True))
    # The order of test_evaluation_order_interleaves_blocks_of_four, less ids 3, 12 and 17.
    assert batch_ids(dataset) == [[0, 1, 2], [10, 11, 13], [4, 5, 6, 7], [14, 15, 8, 9], [16, 18]]
    assert dataset.counts()["skipped_records"] == 3


def test_training_batches_are_the_clean_ones_less_the_damaged_records(tmp_path):
    (tmp_path / "clean").mkdir()
    (tmp_path / "damaged").mkdir()
    clean = RecapDataset(damaged(tmp_path / "clean", {}), seed=5, **TRAINING)
    bad = {5: "not a tf.Example", 11: "wrong length", 18: "label 2"}
    data = damaged(tmp_path / "damaged", bad, ignore_data_errors=True)
    expected = [[i for i in ids if i not in bad] for ids in batch_ids(clean, 12)]  # over 2 epochs of 19
    assert sum(map(len, expected)) < 48  # damaged records were met
    assert batch_ids(RecapDataset(data, seed=5, **TRAINING), 12) == expected
    for k in (3, 7):  # a resumed run reads on exactly where this one was
        resumed = RecapDataset(data, seed=5, **TRAINING)
        resumed.skip_to(k)
        assert batch_ids(resumed, 2) == expected[k : k + 2]


def test_a_training_batch_with_every_record_damaged_stops(tmp_path):
    data = damaged(tmp_path, dict.fromkeys(range(19), "not a tf.Example"), ignore_data_errors=True)
    with pytest.raises(
        DataError,
        match=r"every one of the 4 records of a training batch is damaged \(the first: .*part-\d\.gz: record",
    ):
        next(iter(RecapDataset(data, **TRAINING)))


def test_a_fully_damaged_file_is_logged_a_few_times_and_counted(tmp_path, caplog):
    data = damaged(tmp_path, {}, ignore_data_errors=True, map_num_parallel_calls=1)  # decoded in order
    write_files(tmp_path, [*SIZES, 25], dict.fromkeys(range(19, 44), b"not a tf.Example"))  # part-3
    dataset = RecapDataset(data)
    with caplog.at_level(logging.WARNING):
        ids = batch_ids(dataset)
    # Every clean record, in the clean order: the batches of part-3's records alone are left out.
    assert ids == [[0, 1, 2, 3], [10, 11, 12, 13], [4, 5, 6, 7], [14, 15, 8, 9], [16, 17, 18]]
    assert dataset.counts()["skipped_records"] == 25
    lines = [r.getMessage() for r in caplog.records if "part-3.gz" in r.getMessage()]
    assert [re.sub(r".*part-3\.gz: ", "", line) for line in lines] == [
        "record 0: not a tf.Example: wire type 6 (groups are not used by tf.Example); "
        "ignore_data_errors: skipped the record",
        "record 1: not a tf.Example: wire type 6 (groups are not used by tf.Example); "
        "ignore_data_errors: skipped the record",
        "record 2: not a tf.Example: wire type 6 (groups are not used by tf.Example); "
        "ignore_data_errors: skipped the record; the file's next damaged records are counted, and logged "
        "at 10, 100, 1000, ...",
        "10 damaged records skipped so far (ignore_data_errors)",
    ]


def test_labels_are_int64_or_float_0_or_1(tmp_path):
    labels = [b.labels.tolist() for b in RecapDataset(damaged(tmp_path, {}))]
    assert sum(labels, []) == [
        [i % 3 == 0, i % 5 == 0, i % 2]
        for i in [0, 1, 2, 3, 10, 11, 12, 13, 4, 5, 6, 7, 14, 15, 8, 9, 16, 17, 18]
    ]


def test_counts_report_defaults_filled_damaged_files_and_skipped_records(tmp_path):
    without = {i: encode_example({k: v for k, v in example(i).items() if k != "disc"}) for i in (1, 12)}
    without[5] = encode_example({k: v for k, v in example(5).items() if k != "a"})
    write_files(tmp_path, SIZES, {**without, 11: b"not a tf.Example", 13: DAMAGE["label 2"][0](13)})
    cut = tmp_path / "part-2.gz"
    cut.write_bytes(cut.read_bytes()[:-30])
    dataset = RecapDataset(data_config(tmp_path, tasks=TASKS, ignore_data_errors=True))
    assert dataset.counts() == {"defaults_filled": 0, "damaged_files": 0, "skipped_records": 0}
    list(dataset)
    assert dataset.counts() == {
        "defaults_filled": 3,
        "damaged_files": 1,
        "skipped_records": 2,
        "defaults_filled/a": 1,
        "defaults_filled/disc": 2,  # id 12 once, though its batch (with id 11) was decoded again
    }


def small_rows(n: int) -> list[dict[str, np.ndarray]]:
    """n rows of every feature of configs/segdense_small.json: flags and labels 0 or 1, floats in [0, 1)."""
    specs = load_schema(str(CONFIGS / "segdense_small.json"))
    rng = np.random.default_rng(0)
    return [
        {
            name: rng.integers(0, 2, s.length) if s.dtype == "int64_list" else rng.random(s.length)
            for name, s in specs.items()
        }
        for _ in range(n)
    ]


def write_small_records(path: Path, n: int) -> dict[str, int]:
    """Writes n small_rows, of which for every 10: one not a tf.Example, one with is_favorited 2, one
    without meta.user_id. Returns the counts of reading them all (n a multiple of 10)."""
    rows = small_rows(n)
    for row in rows[1::10]:
        row["recap.engagement.is_favorited"] = np.array([2])
    for row in rows[2::10]:
        del row["meta.user_id"]
    records = [encode_example(row) for row in rows]
    records[::10] = [b"not a tf.Example"] * len(records[::10])
    write_records(str(path), records)
    return {
        "defaults_filled": n // 10,
        "damaged_files": 0,
        "skipped_records": 2 * n // 10,
        "defaults_filled/meta.user_id": n // 10,
    }


def test_data_dump_and_stats_log_what_reading_met(tmp_path, caplog):
    write_small_records(tmp_path / "part-0.gz", 100)
    overrides = [
        f"{split}.{field}"
        for split in ("train_data", "validation_data.validation")
        for field in (f"inputs={tmp_path}/*.gz", "ignore_data_errors=true")
    ]
    config = load_config(CONFIGS / "local_small.yaml", overrides)
    expected = "defaults_filled=10 (meta.user_id=10), damaged_files=0, skipped_records=20"
    with caplog.at_level(logging.INFO):
        where, data = config.split_data("validation")
        dump_batches(
            data,
            seed=config.training.seed,
            split="validation",
            where=where,
            batches=10,
            shuffle=False,
            out=str(tmp_path / "dump.npz"),
        )
        write_feature_stats(
            config.train_data, seed=config.training.seed, out=str(tmp_path / "stats.json"), batches=10
        )
    assert f"validation_data.validation: {expected}" in caplog.messages
    assert f"train_data: {expected}" in caplog.messages
    assert len(np.load(tmp_path / "dump.npz")["labels"]) == 80
