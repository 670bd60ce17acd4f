"""What a follow run holds does not grow with the files it has ever read: the files lag counts only files with
records still to hand out, and (dated folders) the position and the listing leave the days behind the
stream's watermark (every folder of an earlier day listed, and each of its files handed out to its end)."""

from __future__ import annotations

from datetime import datetime

from heavyranker.data.sources.follow import checkpoint_position, restore_done_before, without_days_before
from tests.data.test_follow import config, follow, hour, hours_config, take, write_file


def test_the_files_lag_leaves_out_a_file_with_no_record_to_hand_out(tmp_path):
    # Was counted forever: a damaged file that ignore_data_errors skips whole is read to its end, but no batch
    # ever names it.
    (tmp_path / "a.gz").write_bytes(b"not gzip")
    write_file(tmp_path / "b.gz", range(0, 4))
    with follow(config(f"train_data.inputs={tmp_path}/*.gz", "train_data.ignore_data_errors=true")) as data:
        assert take(data, iter(data), 1) == list(range(4))
        assert data.counts()["damaged_files"] == 1
        assert data.counts()["follow_lag_files"] == 0
        assert data.stream.taken == [str(tmp_path / "a.gz"), str(tmp_path / "b.gz")]


def test_the_position_and_the_stream_let_go_of_the_days_behind_the_watermark(tmp_path):
    for day, first in ((1, 0), (2, 8), (3, 16)):
        hour(tmp_path, f"2026/01/0{day}/00", first)
    with follow(hours_config(tmp_path)) as data:
        batches = iter(data)
        assert take(data, batches, 4) == list(range(16))  # 01-03 00 is the newest folder: not complete
        # Every folder of the days before 01-03 listed, each file handed out to its end; not yet 01-03's.
        assert data.folders_done_before() == datetime(2026, 1, 3)
        assert len(data.position()) == 4
        data.forget_folders_before(datetime(2026, 1, 3))
        assert data.position() == {}
        hour(tmp_path, "2026/01/03/01", 24)
        assert take(data, batches, 2) == list(range(16, 24))
        assert data.stream.taken == [str(tmp_path / f"2026/01/03/00/part-{k}.gz") for k in (0, 1)]
        assert data.stream.last_taken == str(tmp_path / "2026/01/03/00/part-1.gz")
        position = data.position()
    assert sorted(position) == [str(tmp_path / f"2026/01/03/00/part-{k}.gz") for k in (0, 1)]
    # A restart from the watermark lists from its day on: what was trained before it is not read again, and
    # a folder that appears late in a day behind it is not read, as the running stream would not.
    hour(tmp_path, "2026/01/02/05", 1000)
    hour(tmp_path, "2026/01/03/02", 32)
    with follow(hours_config(tmp_path)) as data:
        data.resume(position, datetime(2026, 1, 3))
        assert take(data, iter(data), 2) == list(range(24, 32))


def test_a_checkpoint_keeps_the_watermark_and_only_the_files_past_it(tmp_path):
    cfg = hours_config(tmp_path)
    position = {"a/2026/01/02/23/x.gz": {"next": 1, "done": True, "version": {}}}
    saved = checkpoint_position(cfg.train_data, position, True, datetime(2026, 1, 3))
    assert saved["folders_done_before"] == "2026-01-03"
    state = {"data_position": saved}
    assert restore_done_before(state, cfg.train_data) == datetime(2026, 1, 3)
    assert restore_done_before(state, hours_config(tmp_path / "elsewhere").train_data) is None
    assert without_days_before(position | {0: 5}, datetime(2026, 1, 3), cfg.train_data) == {0: 5}
