"""The Recap dataset on tiny files made here: order, determinism, positioning, sharding, batches, errors.

Every example carries its id in `meta.id` (renamed meta__id), and its other values are functions of the id,
so each test can say which examples a batch must hold and what their values must be."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from heavyranker.config import load_config
from heavyranker.config.data import DataConfig
from heavyranker.config.root import cross_check
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.shapes import feature_shapes
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import DataError, UserError
from tests.conftest import CONFIGS, small_config

SCHEMA = [
    ("cont", "float_list", 6),
    ("bin", "int64_list", 4),
    ("disc", "int64_list", 3),
    ("meta.id", "int64_list", 1),
    ("a", "int64_list", 1),
    ("b", "int64_list", 1),
    ("f", "float_list", 1),  # a label stored as a float
    ("ts.served", "int64_list", 1),
    ("ts.impressed", "int64_list", 1),
    ("ts.engaged_a", "int64_list", 1),
    ("unused", "float_list", 5),
    ("text", "bytes_list", 1),
]
HOUR_MS = 3_600_000
TRAINING = {"shuffle": True, "repeat": True, "drop_last": True}  # how training reads


def data_config(folder: Path, **fields) -> DataConfig:
    """A data config over folder/*.gz with the schema above; `fields` override the defaults."""
    schema = folder / "schema.json"
    schema.write_text(
        json.dumps({"schema": [{"feature_name": n, "dtype": d, "length": k} for n, d, k in SCHEMA]})
    )
    config = {
        "inputs": str(folder / "*.gz"),
        "global_batch_size": 4,
        "file_batch_size": 2,
        "examples_shuffle_buffer_size": 8,
        "seg_dense_schema": {
            "schema_path": str(schema),
            "renamed_features": {
                "continuous": "cont",
                "binary": "bin",
                "discrete": "disc",
                "meta__id": "meta.id",
            },
        },
        "tasks": {"a": {}, "b": {}},
        **fields,
    }
    return DataConfig.model_validate(config)


def example(i: int) -> dict[str, np.ndarray]:
    served = 1_000_000 + 1000 * i
    return {
        "cont": i + 0.125 * np.arange(6, dtype=np.float32),
        "bin": np.array([(i >> k) & 1 for k in range(4)]),
        "disc": np.array([i, -i, i * 2**40]),
        "meta.id": np.array([i]),
        "a": np.array([int(i % 3 == 0)]),
        "b": np.array([int(i % 5 == 0)]),
        "f": np.array([i % 2], dtype=np.float32),
        "ts.served": np.array([served]),
        "ts.impressed": np.array([served + 10]),
        "ts.engaged_a": np.array([served + (2 * HOUR_MS if i % 2 else 20)]),  # odd ids engage 2 hours later
        "unused": np.ones(5, dtype=np.float32),
    }


def write_files(folder: Path, sizes: list[int], replace: dict[int, bytes] | None = None) -> list[list[int]]:
    """Files part-0.gz, part-1.gz, ... holding consecutive ids, the record of id i replaced by replace[i];
    returns each file's ids."""
    ids, start = [], 0
    for f, size in enumerate(sizes):
        ids.append(list(range(start, start + size)))
        records = [(replace or {}).get(i) or encode_example(example(i)) for i in ids[-1]]
        write_records(str(folder / f"part-{f}.gz"), records)
        start += size
    return ids


def batch_ids(dataset, batches: int | None = None) -> list[list[int]]:
    return [b.features["meta__id"].tolist() for b in islice(dataset, batches)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_files(tmp_path, [10, 6, 3])
    return tmp_path


def test_batch_values_shapes_and_dtypes(folder):
    batch = next(iter(RecapDataset(data_config(folder))))
    ids = batch.features["meta__id"]
    assert ids.dtype == torch.int64 and ids.shape == (4,)
    expected = [example(i) for i in ids.tolist()]
    assert set(batch.features) == {"continuous", "binary", "discrete", "meta__id"}
    cont, binary, disc = (batch.features[k] for k in ("continuous", "binary", "discrete"))
    assert cont.dtype == torch.float32 and cont.shape == (4, 6)
    assert binary.dtype == torch.float32 and binary.shape == (4, 4)
    assert disc.dtype == torch.int64 and disc.shape == (4, 3)
    np.testing.assert_array_equal(cont.numpy(), [e["cont"] for e in expected])
    np.testing.assert_array_equal(binary.numpy(), [e["bin"] for e in expected])
    np.testing.assert_array_equal(disc.numpy(), [e["disc"] for e in expected])
    assert batch.tasks == ("a", "b")
    np.testing.assert_array_equal(batch.labels.numpy(), [[i % 3 == 0, i % 5 == 0] for i in ids.tolist()])
    assert batch.labels.dtype == torch.float32 and batch.weights.dtype == torch.float32


def test_evaluation_order_interleaves_blocks_of_four(folder):
    # file_batch_size 2: part-0 and part-1 in blocks of 4 until both end, then part-2; last batch kept.
    assert batch_ids(RecapDataset(data_config(folder))) == [
        [0, 1, 2, 3],
        [10, 11, 12, 13],
        [4, 5, 6, 7],
        [14, 15, 8, 9],
        [16, 17, 18],
    ]
    one_at_a_time = data_config(folder, file_batch_size=1, global_batch_size=19)
    assert batch_ids(RecapDataset(one_at_a_time)) == [list(range(19))]


def test_training_is_deterministic_per_seed_and_repeats(folder):
    data = data_config(folder)
    first = batch_ids(RecapDataset(data, seed=3, **TRAINING), 12)  # 48 examples: more than two passes over 19
    assert first == batch_ids(RecapDataset(data, seed=3, **TRAINING), 12)
    assert first != batch_ids(RecapDataset(data, seed=4, **TRAINING), 12)
    assert all(len(ids) == 4 for ids in first)
    assert sorted(set(sum(first, []))) == list(range(19))
    assert first[:5] != batch_ids(RecapDataset(data), 5)  # shuffled


@pytest.mark.parametrize("reading", [TRAINING, {}])
def test_skip_to_resumes_exactly(folder, reading):
    data = data_config(folder)
    fresh = batch_ids(RecapDataset(data, seed=7, **reading), 5)
    for k in (0, 2, 4):
        resumed = RecapDataset(data, seed=7, **reading)
        resumed.skip_to(k)
        assert batch_ids(resumed, 1)[0] == fresh[k]
    resumed.skip_to(2)
    assert batch_ids(resumed, 3) == fresh[2:5]
    assert batch_ids(resumed, 1)[0] == fresh[0]  # skip_to positions the next iteration only


def test_ranks_read_disjoint_files_covering_everything(tmp_path):
    files = write_files(tmp_path, [5, 4, 3, 2])
    data = data_config(tmp_path, global_batch_size=4)
    seen = []
    for rank in range(2):
        batches = list(RecapDataset(data, rank=rank, world_size=2))
        assert all(len(b) <= 2 for b in batches)  # global 4 over 2 processes
        seen.append(sorted(i for b in batches for i in b.features["meta__id"].tolist()))
    assert seen[0] == sorted(files[0] + files[2]) and seen[1] == sorted(files[1] + files[3])
    assert sorted(seen[0] + seen[1]) == list(range(14))


def test_weights_from_downsampling_rates(folder):
    data = data_config(
        folder, tasks={"a": {"pos_downsampling_rate": 0.5, "neg_downsampling_rate": 0.1}, "b": {}}
    )
    for batch in RecapDataset(data):
        for i, w in zip(batch.features["meta__id"].tolist(), batch.weights.tolist(), strict=True):
            assert w == pytest.approx([2.0 if i % 3 == 0 else 10.0, 1.0])


def test_downsample_negatives_in_the_dataset(tmp_path):
    write_files(tmp_path, [16])
    data = data_config(
        tmp_path,
        tasks={"a": {"neg_downsampling_rate": 0.1}, "b": {}},
        preprocess={
            "downsample_negatives": {"batch_multiplier": 2, "engagements_list": ["a"], "num_engagements": 2}
        },
    )
    first = next(iter(RecapDataset(data)))
    # Records 0..7 read for a batch of 4: positives of a are 0, 3, 6; the first negative, 1, fills the batch
    # and stands for the 5 negatives read: weights 10 * 5 on a (neg rate 0.1), 1 * 5 on b.
    assert first.features["meta__id"].tolist() == [0, 3, 6, 1]
    np.testing.assert_allclose(first.weights.numpy(), [[1, 1], [1, 1], [1, 1], [50, 5]])


def test_rectify_labels_reads_timestamps_it_does_not_output(folder):
    data = data_config(
        folder,
        preprocess={
            "rectify_labels": {
                "label_rectification_window_in_hours": 1.0,
                "served_timestamp_field": "ts.served",
                "impressed_timestamp_field": "ts.impressed",
                "label_to_engaged_timestamp_field": {"a": "ts.engaged_a"},
            }
        },
    )
    batches = list(RecapDataset(data))
    assert set(batches[0].features) == {"continuous", "binary", "discrete", "meta__id"}
    for batch in batches:
        for i, (a, b) in zip(batch.features["meta__id"].tolist(), batch.labels.tolist(), strict=True):
            assert a == (i % 3 == 0 and i % 2 == 0)  # odd ids engaged 2 hours after serving: outside 1 hour
            assert b == (i % 5 == 0)


def test_feature_shapes_match_the_batches(folder):
    np.save(folder / "mask.npy", np.array([1, 0, 1, 1]))
    data = data_config(
        folder,
        preprocess={
            "truncate_and_slice": {
                "continuous_feature_truncation": 4,
                "binary_feature_mask_path": str(folder / "mask.npy"),
            },
            "extract_features": {
                "extract_feature_table": [{"name": "c2", "source_tensor": "continuous", "index": 2}]
            },
        },
    )
    batch = next(iter(RecapDataset(data)))
    assert {k: tuple(v.shape[1:]) for k, v in batch.features.items()} == feature_shapes(data)
    assert feature_shapes(data)["continuous"] == (4,) and feature_shapes(data)["binary"] == (3,)
    np.testing.assert_array_equal(batch.features["c2"].numpy(), batch.features["meta__id"].numpy() + 0.25)


def test_mask_mantissa(folder):
    data = data_config(
        folder,
        seg_dense_schema={
            **data_config(folder).seg_dense_schema.model_dump(),
            "mask_mantissa_features": {"continuous": 20},
        },
    )
    batch = next(iter(RecapDataset(data)))
    expected = np.array([example(i)["cont"] for i in batch.features["meta__id"].tolist()], dtype=np.float32)
    expected = (expected.view(np.uint32) & ~np.uint32(2**20 - 1)).view(np.float32)
    np.testing.assert_array_equal(batch.features["continuous"].numpy(), expected)
    assert not np.array_equal(expected, [example(i)["cont"] for i in batch.features["meta__id"].tolist()])


def test_prediction_reads_no_labels(folder):
    batch = next(iter(RecapDataset(data_config(folder), require_labels=False)))
    assert batch.tasks == () and batch.labels.shape == (4, 0) and batch.weights.shape == (4, 0)


def test_decode_error_names_file_and_record(folder):
    bad = [encode_example(example(100 + i)) for i in range(5)]
    bad[3] = encode_example({**example(103), "cont": np.zeros(5, dtype=np.float32)})
    write_records(str(folder / "part-3.gz"), bad)
    with pytest.raises(DataError, match=r"part-3\.gz: record 3: feature cont: 5 values, the schema says 6"):
        list(islice(RecapDataset(data_config(folder), seed=1, **TRAINING), 20))


def test_damaged_file_fails_or_is_skipped(folder):
    path = folder / "part-1.gz"
    path.write_bytes(path.read_bytes()[:-30])  # cut inside the last record
    with pytest.raises(DataError, match=r"part-1\.gz: record \d"):
        list(RecapDataset(data_config(folder)))
    dataset = RecapDataset(data_config(folder, ignore_data_errors=True))
    ids = sorted(i for ids in batch_ids(dataset) for i in ids)
    assert dataset.damaged_files == [str(path)]
    # Every record of the other files; of part-1 those before the damage (gzip may notice it at the start).
    assert set(range(19)) - set(ids) <= set(range(10, 16)) and len(ids) == len(set(ids))


def test_training_on_nothing_readable_stops(tmp_path):
    (tmp_path / "empty.gz").write_bytes(b"")
    with pytest.raises(DataError, match="no records could be read from any of the 1 files"):
        next(iter(RecapDataset(data_config(tmp_path, ignore_data_errors=True), **TRAINING)))


def test_batch_must_divide_among_processes(folder):
    with pytest.raises(
        UserError, match="train_data.global_batch_size: 5 is not divisible by the world size 2"
    ):
        RecapDataset(data_config(folder, global_batch_size=5), world_size=2, where="train_data")


def test_more_processes_than_files(folder):
    with pytest.raises(UserError, match="3 data file.* for 4 processes.* at least 4 files"):
        RecapDataset(data_config(folder), world_size=4)


def test_no_files_names_the_pattern(tmp_path):
    with pytest.raises(UserError, match=r"no files match inputs '.*/nowhere/\*\.gz'"):
        RecapDataset(data_config(tmp_path, inputs=str(tmp_path / "nowhere" / "*.gz")))


def test_data_dump_command(tmp_path, small_config_path, capsys):
    from heavyranker.cli import main
    from heavyranker.schema import load_schema

    specs = load_schema(str(small_config_path.parent / "segdense_small.json"))
    rng = np.random.default_rng(0)
    rows = [
        {
            n: rng.integers(0, 2, s.length) if s.dtype == "int64_list" else rng.random(s.length)
            for n, s in specs.items()
        }
        for _ in range(10)
    ]
    write_records(str(tmp_path / "part-0.gz"), [encode_example(row) for row in rows])
    out = tmp_path / "dump.npz"
    argv = ["data", "dump", "--config", str(small_config_path), "--inputs", str(tmp_path / "*.gz")]
    assert main([*argv, "--split", "validation", "--no-shuffle", "--out", str(out)]) == 0
    dumped = np.load(out)
    assert dumped["labels"].shape == (10, 13) and dumped["weights"].shape == (10, 13)  # one partial batch
    assert dumped["tasks"][1] == "recap.engagement.is_favorited"
    np.testing.assert_array_equal(dumped["meta__user_id"], [row["meta.user_id"][0] for row in rows])
    np.testing.assert_allclose(
        dumped["continuous"], [row["home_recap_2022_cont__segdense_vals"] for row in rows]
    )
    assert main([*argv, "--split", "nope", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "no split 'nope': the splits are train, validation, validation_downsampled" in error
    # Shuffled by default, yet one pass: more batches asked than the split holds give the split once.
    assert main([*argv, "--split", "validation", "--batches", "5", "--out", str(out)]) == 0
    dumped = np.load(out)
    assert dumped["labels"].shape == (10, 13)
    assert sorted(dumped["meta__user_id"]) == sorted(row["meta.user_id"][0] for row in rows)


def test_a_shuffled_train_dump_holds_trainings_first_batches(tmp_path, small_data):
    from heavyranker.cli import main

    config = small_config(small_data, tmp_path / "run")
    data = config.train_data
    with RecapDataset(data, seed=config.training.seed, shuffle=True, repeat=True, drop_last=True) as dataset:
        expected = torch.cat([batch.features["meta__user_id"] for batch in islice(dataset, 3)]).numpy()
    out = tmp_path / "train.npz"
    inputs = f"train_data.inputs={small_data}/train/*.gz"
    argv = ["data", "dump", "--config", str(CONFIGS / "local_small.yaml"), "--set", inputs]
    assert main([*argv, "--batches", "3", "--out", str(out)]) == 0
    # The shuffle buffer (20,000) outgrows the 4,000-row split: one pass would draw another order.
    np.testing.assert_array_equal(np.load(out)["meta__user_id"], expected)


def config_problems(data: DataConfig) -> list[str]:
    """cross_check's problems with train_data, when `data` is the train_data of configs/local_small.yaml."""
    config = load_config(CONFIGS / "local_small.yaml").model_copy(
        update={"train_data": data, "validation_data": {}}
    )
    return [f"{path}: {message}" for path, message in cross_check(config) if path.startswith("train_data")]


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"tasks": {"cont": {}}},
            r"train_data\.tasks\.cont: the schema gives it 6 values; a label is one value per example",
        ),
        (
            {"tasks": {"nope": {}}},
            r"train_data\.tasks\.nope: no label feature of that name in .*schema\.json",
        ),
        (
            {"seg_dense_schema": {"features": ["gone"]}},
            r"seg_dense_schema\.features: gone is not in .*schema",
        ),
        (
            {"seg_dense_schema": {"features": ["text"]}},
            r"seg_dense_schema\.features: text is a bytes_list, which a batch of tensors cannot hold",
        ),
        (
            {"seg_dense_schema": {"mask_mantissa_features": {"discrete": 3}}},
            r"mask_mantissa_features\.discrete: only float features have a mantissa",
        ),
        (
            {"seg_dense_schema": {"mask_mantissa_features": {"cont": 3}}},
            r"mask_mantissa_features\.cont: not a feature read by this config \(features: continuous, ",
        ),
        (
            {
                "preprocess": {
                    "rectify_labels": {
                        "served_timestamp_field": "ts.nope",
                        "impressed_timestamp_field": "ts.impressed",
                        "label_to_engaged_timestamp_field": {"a": "ts.engaged_a"},
                    }
                }
            },
            r"rectify_labels\.served_timestamp_field: the timestamp ts\.nope is neither a renamed feature "
            r"nor in the schema",
        ),
    ],
)
def test_config_problems_are_named(folder, fields, message):
    """What the dataset relies on in the schema is checked with the config, naming the field to change."""
    assert config_problems(data_config(folder)) == []
    base = data_config(folder).model_dump()
    if "seg_dense_schema" in fields:
        fields = {"seg_dense_schema": {**base["seg_dense_schema"], **fields["seg_dense_schema"]}}
    problems = config_problems(data_config(folder, **fields))
    assert any(re.search(message, line) for line in problems), problems


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_data_threads_yield_to_the_model(folder):
    """Reading runs at nice 19 so that it never takes a core from torch's threads mid-matmul."""
    before = set(threading.enumerate())  # not the remote files' fetch threads, if a test started them
    dataset = RecapDataset(data_config(folder), seed=0, **TRAINING)
    batches = iter(dataset)
    next(batches)
    data_threads = [t for t in set(threading.enumerate()) - before if t.name.startswith("heavyranker-")]
    assert {t.name.split("-")[1].split("_")[0] for t in data_threads} == {"read", "decode", "order"}
    assert {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in data_threads} == {19}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19  # the caller is untouched
    dataset.close()


def test_leaving_the_with_block_stops_the_threads(folder):
    before = set(threading.enumerate())
    with RecapDataset(data_config(folder), seed=0, **TRAINING) as dataset:
        batches = iter(dataset)  # an endless iteration, left open
        next(batches)
        started = [t for t in set(threading.enumerate()) - before if t.name.startswith("heavyranker-")]
        assert {t.name.split("-")[1].split("_")[0] for t in started} == {"read", "decode", "order"}
    for thread in started:
        thread.join(timeout=10)  # the pools' threads end once their current task has
    assert not [t.name for t in started if t.is_alive()]


def test_close_returns_once_the_producer_has_ended(folder):
    """The producer is a daemon thread: one still alive at interpreter exit can free a batch's tensors
    during finalization, which aborts the process."""
    dataset = RecapDataset(data_config(folder), seed=0, **TRAINING)
    batches = iter(dataset)
    next(batches)
    [producer] = [t for t in threading.enumerate() if t.name == "heavyranker-order"]
    dataset.close()
    assert not producer.is_alive()


def test_a_dump_that_fails_mid_write_keeps_the_previous_file(tmp_path, small_data, monkeypatch):
    # It opened --out itself: a full disk left half an .npz under the name, the previous dump lost.
    from heavyranker.data.dump import dump_batches
    from tests.conftest import FullDisk

    out = tmp_path / "dump.npz"
    out.write_bytes(b"the previous dump")
    real_savez = np.savez
    monkeypatch.setattr(np, "savez", lambda f, **arrays: real_savez(FullDisk(f, room=100), **arrays))
    data = small_config(small_data, tmp_path / "run").train_data
    with pytest.raises(OSError, match="No space left on device"):
        dump_batches(data, seed=0, out=str(out))
    assert out.read_bytes() == b"the previous dump"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".dump.npz")]  # no temporary left
