"""File selection: globs, dated folders with missing days/hours, num_files_to_keep, clear errors."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from heavyranker.config.data import DataConfig, ExplicitDateInputs, ExplicitDatetimeInputs
from heavyranker.data.sources.files import (
    date_files,
    dated_folders,
    datetime_files,
    glob_files,
    glob_versions,
    select_files,
    with_end_pinned,
)
from heavyranker.errors import UserError


def touch(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_glob_sorted_files_only(tmp_path):
    b = touch(tmp_path / "b.gz")
    a = touch(tmp_path / "a.gz")
    (tmp_path / "c.gz").mkdir()  # a folder that matches is not a file
    assert glob_files(str(tmp_path / "*.gz")) == [a, b]


def test_glob_without_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.gz")
    with pytest.raises(UserError, match=r"no files match inputs '.*nothing/\*\.gz'"):
        glob_files(pattern)


def test_dates_inclusive_end_and_gz_only(tmp_path):
    day1 = touch(tmp_path / "2023/01/01/part-1.gz")
    day3b = touch(tmp_path / "2023/01/03/b.gz")
    day3a = touch(tmp_path / "2023/01/03/a.GZ")
    touch(tmp_path / "2023/01/03/_SUCCESS")
    touch(tmp_path / "2023/01/04/later.gz")  # after end_date
    touch(tmp_path / "2022/12/31/earlier.gz")  # before the window
    (tmp_path / "2023/01/02").mkdir(parents=True)  # an empty day: missing
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="2023-01-03", days=3, num_missing_days_tol=1)
    assert date_files(spec) == [day1, day3a, day3b]


def test_dates_missing_past_tolerance(tmp_path):
    touch(tmp_path / "2023/01/03/a.gz")
    (tmp_path / "2023/01/02").mkdir(parents=True)
    touch(tmp_path / "2023/01/02/README")  # no .gz: counts as missing
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="2023-01-03", days=3, num_missing_days_tol=1)
    with pytest.raises(UserError) as e:
        date_files(spec)
    message = str(e.value)
    assert "2 of 3 days have no .gz data files" in message
    assert str(tmp_path / "2023/01/01") in message and str(tmp_path / "2023/01/02") in message
    assert "num_missing_days_tol allows 1" in message


def test_datetimes_cross_midnight(tmp_path):
    a = touch(tmp_path / "2022/12/31/23/a.gz")
    b = touch(tmp_path / "2023/01/01/01/b.gz")
    touch(tmp_path / "2023/01/01/02/after.gz")
    spec = ExplicitDatetimeInputs(
        data_root=str(tmp_path), end_datetime="2023-01-01T01", hours=3, num_missing_hours_tol=1
    )  # hour 00 is missing
    assert datetime_files(spec) == [a, b]
    strict = spec.model_copy(update={"num_missing_hours_tol": 0})
    with pytest.raises(UserError, match=r"1 of 3 hours .*2023/01/01/00.*num_missing_hours_tol allows 0"):
        datetime_files(strict)


def test_all_missing_within_tolerance_is_still_no_files(tmp_path):
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="2023-01-03", days=2, num_missing_days_tol=5)
    with pytest.raises(UserError, match=r"no \.gz data files in .*2023/01/02 \.\. .*2023/01/03"):
        date_files(spec)


def test_select_files_keeps_the_first_n(tmp_path):
    paths = [touch(tmp_path / f"{i}.gz") for i in range(5)]
    schema = tmp_path / "schema.json"
    schema.write_text('{"schema": [{"feature_name": "a", "dtype": "int64_list", "length": 1}]}')
    data = DataConfig(
        inputs=str(tmp_path / "*.gz"),
        num_files_to_keep=2,
        global_batch_size=1,
        seg_dense_schema={"schema_path": str(schema)},
        tasks={"a": {}},
    )
    assert select_files(data) == paths[:2]


@pytest.mark.parametrize("year", ["\u0662\u0660\u0662\u0663", "\uff12\uff10\uff12\uff13"])
def test_a_folder_of_digits_other_than_ascii_is_no_date(tmp_path, year):
    # isdigit() and strptime take Arabic-Indic and full-width digits: the day would be followed twice.
    touch(tmp_path / "2023/01/03/a.gz")
    touch(tmp_path / year / "01/03/b.gz")
    found = dated_folders(str(tmp_path), datetime(2023, 1, 1), hours=False)
    assert found == [(datetime(2023, 1, 3), os.path.join(tmp_path, "2023", "01", "03"))]


def test_a_file_reached_through_links_is_listed_once(tmp_path):
    # `**` goes through links to folders: a link to the folder above made 41 paths of each file, and
    # training read each of them.
    data = touch(tmp_path / "data" / "day" / "part-0.gz")
    (tmp_path / "data" / "day" / "up").symlink_to("..")
    (tmp_path / "data" / "latest").symlink_to("day")
    (tmp_path / "data" / "dangling").symlink_to("nowhere")
    pattern = str(tmp_path / "data" / "**" / "*.gz")
    assert glob_files(pattern) == [data]
    assert list(glob_versions(pattern)) == [data]


def test_latest_ends_at_the_newest_folder_that_holds_a_data_file(tmp_path):
    touch(tmp_path / "2023/01/01/23/a.gz")
    b = touch(tmp_path / "2023/01/02/00/b.gz")
    c = touch(tmp_path / "2023/01/02/01/c.gz")
    touch(tmp_path / "2023/01/02/02/_SUCCESS")  # newer, but no data file
    (tmp_path / "2023/01/02/03").mkdir()  # newer, empty: being written
    (tmp_path / "2024/01/01").mkdir(parents=True)  # a newer year without any hour folder
    touch(tmp_path / "2024/13/01/00/d.gz")  # no date
    touch(tmp_path / "2024/01/01/\u0660\u0660/e.gz")  # Arabic-Indic digits: no hour
    spec = ExplicitDatetimeInputs(data_root=str(tmp_path), end_datetime="latest", hours=2)
    assert datetime_files(spec) == [b, c]
    # A newer hour gets its data: the next read of the split moves with it.
    d = touch(tmp_path / "2023/01/02/02/d.gz")
    assert datetime_files(spec) == [c, d]
    days = ExplicitDateInputs(data_root=str(tmp_path), end_date="latest", days=1)
    with pytest.raises(UserError, match=r"latest, but no YYYY/MM/DD folder under"):  # the files are in hours
        date_files(days)


def test_latest_without_a_dated_folder_is_one_line(tmp_path):
    touch(tmp_path / "2023/01/02/notes.txt")
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="latest", days=3)
    with pytest.raises(UserError) as e:
        date_files(spec)
    assert str(e.value) == (
        f"explicit_date_inputs.end_date: latest, but no YYYY/MM/DD folder under {tmp_path} holds a data file"
    )


def test_latest_near_the_year_1_is_one_line(tmp_path):
    touch(tmp_path / "0001/01/02/a.gz")
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="latest", days=3)
    with pytest.raises(UserError, match=r"latest is .*0001/01/02, and the folders before it reach before"):
        date_files(spec)


def test_a_followed_split_cannot_end_at_latest(tmp_path):
    from heavyranker.data.sources.follow import follow_sources
    from tests.conftest import small_config

    dated = f"{{data_root: {tmp_path}, end_datetime: latest, hours: 2}}"
    overrides = [
        "train_data.inputs=null",
        f"train_data.explicit_datetime_inputs={dated}",
        "training.follow=true",
    ]
    config = small_config(tmp_path, tmp_path, *overrides)
    with pytest.raises(UserError, match=r"^training.follow .* end at latest, .* a restart must start where"):
        follow_sources(config)


def test_latest_in_the_future_is_taken_with_a_warning(tmp_path, caplog):
    # A misnamed folder (2062 for 2026) would otherwise hold the split's end for decades, unsaid.
    touch(tmp_path / "2023/01/01/a.gz")
    future = touch(tmp_path / "2062/01/01/b.gz")
    spec = ExplicitDateInputs(data_root=str(tmp_path), end_date="latest", days=1)
    assert date_files(spec) == [future]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"explicit_date_inputs.end_date: latest is {tmp_path}/2062/01/01, more than a day after now (UTC): "
        "a misnamed folder?"
    ]
    touch(tmp_path / f"{datetime.now().year}/01/01/c.gz")
    caplog.clear()
    (tmp_path / "2062/01/01/b.gz").unlink()
    date_files(spec)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_pinned_latest_reads_the_same_folders_after_a_newer_one_lands(tmp_path):
    a = touch(tmp_path / "0001/01/02/00/a.gz")  # a year of 1 digit under %Y: the pinned end must parse
    b = touch(tmp_path / "0001/01/02/01/b.gz")
    dated = ExplicitDatetimeInputs(data_root=str(tmp_path), end_datetime="latest", hours=2)
    schema = tmp_path / "schema.json"
    schema.write_text('{"schema": [{"feature_name": "a", "dtype": "int64_list", "length": 1}]}')
    data = DataConfig(
        explicit_datetime_inputs=dated,
        global_batch_size=1,
        seg_dense_schema={"schema_path": str(schema)},
        tasks={"a": {}},
    )
    pinned = with_end_pinned(data)
    assert pinned.explicit_datetime_inputs.end_datetime == "0001-01-02T01"
    touch(tmp_path / "0001/01/02/02/c.gz")
    assert select_files(pinned) == [a, b]
    assert select_files(data) != [a, b]  # unpinned, it moves on
    fixed = data.model_copy(update={"explicit_datetime_inputs": pinned.explicit_datetime_inputs})
    assert with_end_pinned(fixed) is fixed
