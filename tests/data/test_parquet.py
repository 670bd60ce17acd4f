"""Parquet input: the same rows written once as TFRecord (our encoder) and once as Parquet (by pyarrow itself,
in list, fixed-size-list and scalar columns, over several row groups) give identical batches, whatever the
reading (shuffle, preprocessors, the decoded cache, skip_to); damage names file, row group and column; and a
file is read a row group at a time."""

from __future__ import annotations

import os
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heavyranker.cli import main
from heavyranker.data.convert import convert_files
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.sources import PARQUET, TFRECORD, file_format
from heavyranker.data.sources.parquet import read_rows
from heavyranker.data.sources.tfrecord import read_records
from heavyranker.errors import DataError, UserError
from tests.conftest import CONFIGS
from tests.data.test_cache import PREPROCESS, assert_same, read
from tests.data.test_dataset import SCHEMA, TRAINING, batch_ids, data_config, example, write_files

SIZES = [10, 6, 3]
LENGTHS = {name: length for name, _, length in SCHEMA}
# How each column is stored: every feature of length > 1 as a list or a fixed-size list, those of length 1
# as scalars or as lists of one; the float label "f" as float64, which is read as float32.
LISTS = ("cont", "disc", "b")
FIXED = ("bin", "unused")


def column(name: str, ids: list[int]) -> pa.Array:
    values = np.stack([example(i)[name] for i in ids])  # [rows, length]
    if name == "f":
        return pa.array(values[:, 0].astype(np.float64))
    if name in FIXED:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), LENGTHS[name])
    if name in LISTS:
        return pa.array(list(values))  # a list<> column, each row a numpy array
    return pa.array(values[:, 0])


def write_parquet(folder: Path, sizes: list[int], damaged: dict[str, pa.Array | None] | None = None) -> None:
    """part-0.parquet, ... holding the ids write_files gives its TFRecord files, written by pyarrow, 4 rows
    to a row group, so that a file spans several. `damaged`: the first file's columns replaced by these
    (None: left out)."""
    start = 0
    for f, size in enumerate(sizes):
        ids = list(range(start, start + size))
        columns = {name: column(name, ids) for name in example(0)} | (damaged or {} if f == 0 else {})
        table = pa.table({name: values for name, values in columns.items() if values is not None})
        pq.write_table(table, folder / f"part-{f}.parquet", row_group_size=4)
        start += size


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    tfrecord, parquet = tmp_path / "tfrecord", tmp_path / "parquet"
    tfrecord.mkdir()
    parquet.mkdir()
    write_files(tfrecord, SIZES)
    write_parquet(parquet, SIZES)
    return tfrecord, parquet


def configs(folders: tuple[Path, Path], **fields):
    tfrecord, parquet = folders
    return (
        data_config(tfrecord, **fields),
        data_config(parquet, inputs=str(parquet / "*.parquet"), **fields),
    )


@pytest.mark.parametrize("reading", [TRAINING, {}], ids=["training", "evaluation"])
@pytest.mark.parametrize("preprocess", [None, PREPROCESS], ids=["plain", "every-preprocessor"])
@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "cached"])
def test_parquet_gives_the_tfrecord_batches(folders, tmp_path, reading, preprocess, cache):
    cached = {"cache": True, "cache_dir": str(tmp_path / "cache"), "cache_workers": 1} if cache else {}
    tfrecord, parquet = configs(folders, preprocess=preprocess, **cached)
    batches = 12 if reading else None
    want = read(tfrecord, batches, **reading)
    assert len(want) >= 3
    assert_same(read(parquet, batches, **reading), want)
    if cache:  # again, from the entries built above
        assert_same(read(parquet, batches, **reading), want)
    for skip in (1, 2):  # resuming after `skip` batches: the batches an uninterrupted read gives there
        assert_same(read(parquet, 2, skip=skip, **reading), want[skip : skip + 2])


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_the_tfrecord_rank_s_batches(folders, rank):
    tfrecord, parquet = configs(folders, global_batch_size=4)
    shard = {"rank": rank, "world_size": 2, **TRAINING}
    want = list(islice(RecapDataset(tfrecord, **shard), 6))
    assert_same(list(islice(RecapDataset(parquet, **shard), 6)), want)
    assert len(want[0]) == 2


def test_the_format_is_detected_from_the_file_names(folders):
    tfrecord, parquet = configs(folders)
    assert file_format(tfrecord, ["a.gz", "b.tfrecord"]) is TFRECORD
    assert file_format(parquet, ["a.parquet", "b.PARQUET"]) is PARQUET
    assert file_format(parquet.model_copy(update={"format": "tfrecord"}), ["a.parquet"]) is TFRECORD
    with pytest.raises(UserError, match=r"two formats: x/b\.parquet is Parquet and x/a\.gz is not"):
        file_format(tfrecord, ["x/a.gz", "x/b.parquet"])


def test_hive_partitioned_folders_are_read_by_a_glob(tmp_path, folders):
    """dt=.../hour=.../part-N.parquet, as Spark writes a partitioned table: a glob over the partitions reads
    them in path order (dates and zero-padded hours sort in time order); the partition values are not
    columns."""
    tfrecord, flat = folders
    for f, (dt, hour) in enumerate([("2026-11-30", "23"), ("2026-12-01", "05"), ("2026-12-01", "17")]):
        partition = tmp_path / "table" / f"dt={dt}" / f"hour={hour}"
        partition.mkdir(parents=True)
        (flat / f"part-{f}.parquet").rename(partition / "part-0.parquet")
    (tmp_path / "table" / "_SUCCESS").touch()  # Spark's marker: not matched by the glob
    hive = data_config(tmp_path / "table", inputs=str(tmp_path / "table" / "dt=*" / "hour=*" / "*.parquet"))
    assert batch_ids(RecapDataset(hive)) == batch_ids(RecapDataset(data_config(tfrecord)))


def test_a_file_is_read_a_row_group_at_a_time(tmp_path, folders):
    """A file of 50 row groups whose row group 40 is damaged: the first rows come without reading it (a file
    read whole would fail at once); reading on meets it, naming the file, row group and column."""
    path = tmp_path / "big.parquet"
    ids = list(range(5000))
    table = pa.table({"meta.id": column("meta.id", ids), "cont": column("cont", ids)})
    pq.write_table(table, path, row_group_size=100, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(40).column(1)  # cont's values in row group 40
    with open(path, "r+b") as f:  # garbage over the page header: thrift cannot parse it
        f.seek(chunk.data_page_offset)
        f.write(b"\xff" * 64)
    specs = data_config(folders[0]).seg_dense_schema.specs
    rows = read_rows(str(path), {name: specs[name] for name in table.column_names})
    first = [next(rows) for _ in range(300)]
    assert [int(columns["meta.id"][row, 0]) for columns, row in first] == ids[:300]
    with pytest.raises(DataError, match=rf"^{path}: row group 40: unreadable \("):
        for _ in rows:
            pass


@pytest.mark.parametrize(
    "name, values, group, problem",
    [
        ("cont", None, 0, r"column cont: missing \(a schema feature the config reads\)"),
        (
            "cont",
            pa.array([["x"] * 6] * 10),
            0,
            r"column cont: values of type string; float_list needs float",
        ),
        ("meta.id", pa.array([1.5] * 10), 0, r"column meta\.id: values of type double; int64_list needs int"),
        ("disc", pa.array([[1, 2, 3]] * 7 + [[1, 2]] + [[1, 2, 3]] * 2), 1, r"column disc: row 7 holds 2 "),
        ("bin", pa.array([[0] * 5] * 10, pa.list_(pa.int64(), 5)), 0, r"column bin: lists of 5 values"),
        ("cont", pa.array(np.zeros(10, np.float32)), 0, r"column cont: a column of float, not of lists"),
        ("a", pa.array([0] * 5 + [None] + [0] * 4, pa.int64()), 1, r"column a: row 5 is null"),
    ],
    ids=["missing", "type", "scalar-type", "list-length", "fixed-length", "scalar-for-a-list", "null"],
)
def test_a_damaged_column_names_file_row_group_and_column(tmp_path, name, values, group, problem):
    """The first file (ids 0..9) is damaged in the column `name` from row group `group` (4 rows each) on:
    a one-line DataError naming file, row group and column; with ignore_data_errors its rows before the
    damage are read, the rest of it skipped and counted, and the second file read whole."""
    write_parquet(tmp_path, SIZES[:2], damaged={name: values})
    path = tmp_path / "part-0.parquet"
    data = data_config(tmp_path, inputs=str(tmp_path / "*.parquet"))
    with pytest.raises(DataError, match=rf"^{path}: row group {group}: {problem}"):
        list(RecapDataset(data))
    kept = RecapDataset(data.model_copy(update={"ignore_data_errors": True}))
    assert sorted(sum(batch_ids(kept), [])) == [*range(4 * group), *range(10, 16)]
    assert kept.counts()["damaged_files"] == 1


def test_dated_folders_list_the_format_s_files(tmp_path, folders):
    """explicit_datetime_inputs: data_root/YYYY/MM/DD/HH. By default a folder's .gz and .parquet files are
    listed and the format detected from them; `format` lists only its own."""
    tfrecord, flat = folders
    want = batch_ids(RecapDataset(data_config(tfrecord)))
    root = tmp_path / "root"
    for f, hour in enumerate(["2026/11/30/23", "2026/12/01/00", "2026/12/01/01"]):
        (root / hour).mkdir(parents=True)
        (flat / f"part-{f}.parquet").rename(root / hour / f"part-{f}.parquet")
    dated = {"data_root": str(root), "end_datetime": "2026-12-01T01", "hours": 3}
    data = data_config(tmp_path, inputs=None, explicit_datetime_inputs=dated)
    assert batch_ids(RecapDataset(data)) == want
    (tfrecord / "part-0.gz").rename(root / "2026/12/01/00/stray.gz")
    with pytest.raises(UserError, match=r"two formats: .*part-0\.parquet is Parquet and .*stray\.gz is not"):
        RecapDataset(data)
    parquet_only = data.model_copy(update={"format": "parquet"})
    assert batch_ids(RecapDataset(parquet_only)) == want
    tfrecord_only = data.model_copy(update={"format": "tfrecord"})
    with pytest.raises(UserError, match=r"2 of 3 hours have no \.gz data files .*allows 0$"):
        RecapDataset(tfrecord_only)


def test_convert_writes_each_file_in_the_other_format(tmp_path, folders):
    """TFRecord -> Parquet and pyarrow's Parquet -> TFRecord: one file per file, same name, the same batches
    read back; nothing temporary left behind."""
    tfrecord, parquet = configs(folders)
    want = read(tfrecord, 8, **TRAINING)
    written = convert_files(tfrecord, to="parquet", out=str(tmp_path / "as-parquet"))
    assert [Path(p).name for p in written] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert sorted(os.listdir(tmp_path / "as-parquet")) == [
        "part-0.parquet",
        "part-1.parquet",
        "part-2.parquet",
    ]
    assert pq.ParquetFile(written[1]).metadata.num_rows == SIZES[1]
    converted = data_config(tmp_path, inputs=str(tmp_path / "as-parquet" / "*.parquet"))
    assert_same(read(converted, 8, **TRAINING), want)
    convert_files(parquet, to="tfrecord", out=str(tmp_path / "as-tfrecord"))
    assert sorted(os.listdir(tmp_path / "as-tfrecord")) == ["part-0.gz", "part-1.gz", "part-2.gz"]
    assert_same(read(data_config(tmp_path / "as-tfrecord"), 8, **TRAINING), want)
    with pytest.raises(UserError, match=r"the files are parquet already"):
        convert_files(parquet, to="parquet", out=str(tmp_path / "again"))


def test_the_convert_command_keeps_paths_below_the_inputs_folder(tmp_path, small_data):
    """Files in hour folders: each keeps its path below the folder they share, so that the part-0 of every
    hour stays apart; the rows are those of the input."""
    inputs = sorted((small_data / "train").glob("*.gz"))[:2]
    for hour, path in zip(("00", "01"), inputs, strict=True):
        (tmp_path / "root" / hour).mkdir(parents=True)
        shutil.copy(path, tmp_path / "root" / hour / "part-0.gz")
    out = tmp_path / "out"
    args = ["data", "convert", "--config", str(CONFIGS / "local_small.yaml"), "--to", "parquet"]
    assert main([*args, "--inputs", f"{tmp_path}/root/*/*.gz", "--out", str(out)]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [
        "00/part-0.parquet",
        "01/part-0.parquet",
    ]
    rows = [sum(1 for _ in read_records(str(path))) for path in inputs]
    assert [pq.ParquetFile(out / h / "part-0.parquet").metadata.num_rows for h in ("00", "01")] == rows


def test_convert_refuses_two_inputs_of_one_output_name_and_writes_nothing(tmp_path, folders):
    # part-0.gz and part-0.tfrecord both became part-0.parquet: the second silently replaced the first.
    root, out = tmp_path / "root", tmp_path / "out"
    root.mkdir()
    for name in ("part-0.gz", "part-0.tfrecord"):
        shutil.copy(folders[0] / "part-0.gz", root / name)
    with pytest.raises(
        UserError, match=r"root/part-0.gz and .*root/part-0.tfrecord would both be written to"
    ):
        convert_files(data_config(root), to="parquet", out=str(out), inputs=f"{root}/part-0.*")
    assert not out.exists()


def test_convert_refuses_to_write_over_one_of_its_inputs(tmp_path, folders):
    # format: tfrecord reads x.parquet as TFRecord: its output, x.parquet in the same folder, replaced it.
    named = tmp_path / "named"
    named.mkdir()
    for path in sorted(folders[0].glob("*.gz")):
        shutil.copy(path, named / path.with_suffix(".parquet").name)
    before = {p.name: p.read_bytes() for p in named.glob("*.parquet")}
    data = data_config(named, format="tfrecord")
    with pytest.raises(UserError, match=r"named/part-0.parquet: --out would write over this input"):
        convert_files(data, to="parquet", out=str(named), inputs=f"{named}/*.parquet")
    assert {p.name: p.read_bytes() for p in named.glob("*.parquet")} == before
