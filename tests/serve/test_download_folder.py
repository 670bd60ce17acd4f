"""A server's download folder outlives a SIGKILL until the next server starts; a live server's is kept."""

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from heavyranker.serve.download_folder import DownloadFolder

PREFIX = "heavyranker-repository-"
HOLD = (
    "import sys; from heavyranker.serve.download_folder import DownloadFolder\n"
    f"folder = DownloadFolder({PREFIX!r}); (folder.path / 'model.pt2').write_text('weights')\n"
    "print(folder.path, flush=True); sys.stdin.readline()\n"
)


@pytest.fixture
def temporary(tmp_path, monkeypatch):
    """The temporary folder, here and in the processes started: tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def holding_server() -> tuple[subprocess.Popen, str]:
    """A process holding a download folder with a file in it, and the folder."""
    server = subprocess.Popen(
        [sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return server, server.stdout.readline().strip()


def test_the_folder_of_a_killed_server_is_removed_by_the_next(temporary):
    server, folder = holding_server()
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    assert os.listdir(folder) == ["model.pt2"]  # the kill left it
    ours = DownloadFolder(PREFIX)
    assert sorted(os.listdir(temporary)) == sorted([ours.path.name, ours.path.name + ".lock"])
    ours.close()
    assert os.listdir(temporary) == []


def test_the_folder_of_a_running_server_is_kept(temporary):
    server, folder = holding_server()
    try:
        ours = DownloadFolder(PREFIX)
        assert os.listdir(folder) == ["model.pt2"]
        ours.close()
    finally:
        server.communicate("\n", timeout=60)
    assert server.returncode == 0
    assert os.listdir(temporary) == []  # the server removed its own folder as it ended


def test_a_folder_without_a_lock_file_is_left_alone(temporary):
    (temporary / f"{PREFIX}older").mkdir()  # a version before the locks, or one being created
    DownloadFolder(PREFIX).close()
    assert os.listdir(temporary) == [f"{PREFIX}older"]
