"""What a follow run holds does not grow with the files it has ever read: the files lag counts only files with
records still to hand out, and (dated folders) the position and the listing leave the days behind the
stream's watermark (every folder of an earlier day listed, and each of its files handed out to its end)."""

from __future__ import annotations

from tests.data.test_follow import config, follow, take, write_file


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
