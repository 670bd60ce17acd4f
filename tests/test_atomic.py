import glob
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from heavyranker.atomic import Temporary, atomic_path, atomic_write, temporaries


@contextmanager
def through_path(path: Path):
    """atomic_path, the file opened by the writer itself."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        yield f


FLAVOURS = [through_path, atomic_write]


@pytest.mark.parametrize("opened", FLAVOURS)
def test_the_content_appears_under_the_name_alone(tmp_path, opened):
    with opened(tmp_path / "out.gz") as f:
        f.write(b"new")
    assert (tmp_path / "out.gz").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.gz"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("opened", FLAVOURS)
def test_an_error_mid_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, opened, error):
    path = tmp_path / "out.gz"
    path.write_bytes(b"old")
    with pytest.raises(error), opened(path) as f:
        f.write(b"partial")
        f.flush()
        raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.gz"]


def test_the_temporary_is_hidden_from_globs_while_it_is_written(tmp_path):
    with atomic_write(tmp_path / "part-0.gz") as f:
        writer = f"{os.getpid()}-{threading.get_native_id()}"
        assert os.listdir(tmp_path) == [f".part-0.gz.tmp-{writer}"]  # it exists...
        assert glob.glob(str(tmp_path / "*")) == []  # ...unseen
        f.write(b"data")
    assert glob.glob(str(tmp_path / "*")) == [str(tmp_path / "part-0.gz")]


@pytest.mark.parametrize("opened", FLAVOURS)
def test_the_file_and_its_folder_are_fsynced(tmp_path, opened, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    with opened(tmp_path / "out.json") as f:
        f.write(b"{}")
    # A rename keeps the inode: the file fsynced under its temporary name is the one now under its name.
    assert sorted(synced) == sorted([(tmp_path / "out.json").stat().st_ino, tmp_path.stat().st_ino])


def test_temporaries_name_the_file_they_replace_and_their_writer(tmp_path):
    (tmp_path / ".hidden").touch()
    (tmp_path / "visible.tmp-12").touch()
    writer = f"{os.getpid()}-{threading.get_native_id()}"
    with atomic_write(tmp_path / "part-0.gz"):
        assert temporaries(tmp_path) == [
            Temporary(tmp_path / f".part-0.gz.tmp-{writer}", "part-0.gz", os.getpid())
        ]
    assert temporaries(tmp_path) == []
    assert temporaries(tmp_path / "absent") == []
    # One of a version before the thread was in the name, left by a killed writer: still found.
    (tmp_path / ".part-1.gz.tmp-77").touch()
    assert temporaries(tmp_path) == [Temporary(tmp_path / ".part-1.gz.tmp-77", "part-1.gz", 77)]


def test_threads_writing_one_file_at_once_each_write_a_whole_file(tmp_path):
    """Two threads of one process shared one temporary: the first rename took it from under the second."""
    path, start = tmp_path / "out.bin", threading.Barrier(8)
    errors = []

    def write(i: int) -> None:
        try:
            with atomic_write(path) as f:
                start.wait()  # every thread has its temporary open before any writes
                for _ in range(64):
                    f.write(bytes([i]) * 4096)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    content = path.read_bytes()
    assert len(content) == 64 * 4096 and len(set(content)) == 1  # one thread's file, whole
    assert temporaries(tmp_path) == []


def test_a_name_that_is_almost_a_temporary_is_none(tmp_path):
    # Arabic-Indic digits as the pid, a newline after it: a stale-temporary sweep must not unlink
    # ".part-0.gz.tmp-12", another file, for them.
    (tmp_path / ".part-0.gz.tmp-\u0661\u0662").touch()
    (tmp_path / ".part-0.gz.tmp-12\n").touch()
    assert temporaries(tmp_path) == []
