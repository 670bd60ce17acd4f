"""A model repository in object storage (moto's S3 server on loopback): versions are numbered from one and
complete only with a READY whose files are all there, a half-uploaded version is never listed nor served,
retention deletes, and `serve --repository s3://...` swaps to a new version."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import numpy as np
import pytest

from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.serve.app import create_app
from heavyranker.serve.object_repository import ObjectRepository
from heavyranker.serve.repository import READY, TRITON_CONFIG, open_repository
from heavyranker.serve.scorer import MANIFEST
from tests.data.test_storage import moto_server, s3_endpoint
from tests.serve.conftest import ENV_VALUE, ENV_VAR, OVERRIDES, Exported, serving
from tests.serve.test_hot_swap import NAME, expected, programs, rank  # noqa: F401 (fixtures)

BUCKET = "models"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with moto_server() as url:
        with s3_endpoint(url):
            fsspec.filesystem("s3").mkdir(BUCKET)
        yield url


@pytest.fixture
def s3(server, request) -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """The file system and a fresh repository URL for each test."""
    with s3_endpoint(server):
        yield fsspec.filesystem("s3"), f"s3://{BUCKET}/{request.node.name[:40]}"


def writing(text: str):
    def write(folder: Path) -> None:
        (folder / "model.txt").write_text(text)
        (folder / TRITON_CONFIG).write_text(f"config of {text}\n")

    return write


def copying(folder: Path):
    return lambda staging: shutil.copytree(folder, staging, dirs_exist_ok=True)


def test_versions_are_numbered_complete_and_pruned(s3):
    fs, url = s3
    repository = open_repository(url, NAME)
    assert isinstance(repository, ObjectRepository) and repository.versions() == []
    assert [repository.publish(writing(t), keep=None) for t in "ab"] == [1, 2]
    assert repository.versions() == [1, 2]
    # READY names each file with its size and SHA-256, computed here independently.
    ready = json.loads(fs.cat_file(f"{BUCKET}/{url.split('/')[-1]}/{NAME}/2/{READY}"))
    assert ready["files"]["model.txt"] == {"size": 1, "sha256": hashlib.sha256(b"b").hexdigest()}
    assert fs.cat_file(f"{url}/{NAME}/{TRITON_CONFIG}") == b"config of b\n"
    assert (repository.local_folder(1) / "model.txt").read_text() == "a"
    # Retention deletes every object of the old versions, except the one a server serves.
    repository.publish(writing("c"), keep=None)
    repository.mark_served(1)
    assert repository.served_versions() == [1]
    repository.publish(writing("d"), keep=1)
    assert repository.versions() == [1, 4]
    assert not fs.exists(f"{url}/{NAME}/2") and not fs.exists(f"{url}/{NAME}/3")
    repository.unmark_served()
    assert repository.prune(1) == [1] and repository.versions() == [4]
    # No claim object is left behind.
    names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{url}/{NAME}/4"))
    assert names == [READY, TRITON_CONFIG, "model.txt"]


def test_a_half_uploaded_version_is_not_a_version(s3):
    fs, url = s3
    repository = open_repository(url, NAME)
    repository.publish(writing("a"), keep=None)
    folder = f"{url}/{NAME}"
    fs.pipe_file(f"{folder}/2/model.txt", b"half")  # uploaded files, no READY yet
    # A READY that names a file not (yet) there, or there with another size.
    fs.pipe_file(f"{folder}/3/model.txt", b"x")
    sizes = {"model.txt": {"size": 1, "sha256": "0"}, "schema.json": {"size": 5, "sha256": "0"}}
    fs.pipe_file(f"{folder}/3/{READY}", json.dumps({"published": 0, "files": sizes}).encode())
    fs.pipe_file(f"{folder}/4/model.txt", b"longer")
    one = {"published": 0, "files": {"model.txt": sizes["model.txt"]}}
    fs.pipe_file(f"{folder}/4/{READY}", json.dumps(one).encode())
    fs.pipe_file(f"{folder}/5/{READY}", b"not json")
    fs.pipe_file(f"{folder}/\u00b2/{READY}", json.dumps(one).encode())  # not a number: int() refuses it
    assert repository.versions() == [1]
    assert repository.publish(writing("b"), keep=None) == 6  # the numbers in use are not reused
    assert repository.versions() == [1, 6]


def test_a_file_changed_after_ready_is_refused_on_download(s3):
    fs, url = s3
    repository = open_repository(url, NAME)
    repository.publish(writing("a"), keep=None)
    fs.pipe_file(f"{url}/{NAME}/1/model.txt", b"z")  # the same size: listed as complete, damaged
    with pytest.raises(UserError, match="SHA-256 differs from READY's"):
        repository.local_folder(1)


def test_a_number_published_again_is_downloaded_again(s3):
    fs, url = s3
    repository = open_repository(url, NAME)
    for text in "ab":
        repository.publish(writing(text), keep=None)
    assert (repository.local_folder(2) / "model.txt").read_text() == "b"
    fs.rm(f"{url}/{NAME}/2", recursive=True)  # a rollback: the newest version removed
    assert repository.versions() == [1]
    assert repository.publish(writing("c"), keep=None) == 2
    assert (repository.local_folder(2) / "model.txt").read_text() == "c"


def test_a_ready_naming_a_file_outside_its_version_is_refused_and_nothing_is_written(s3, tmp_path):
    # An object's key may hold '..': the download wrote the file where the key pointed on the server's host.
    fs, url = s3
    repository = open_repository(url, NAME)
    repository.publish(writing("a"), keep=None)
    escape = "../" * 20 + str(tmp_path / "planted.txt").lstrip("/")
    folder = f"{url}/{NAME}/2"
    fs.pipe_file(f"{folder}/model.txt", b"b")
    fs.pipe_file(f"{folder}/{escape}", b"planted")
    files = {
        "model.txt": {"size": 1, "sha256": hashlib.sha256(b"b").hexdigest()},
        escape: {"size": 7, "sha256": hashlib.sha256(b"planted").hexdigest()},
    }
    fs.pipe_file(f"{folder}/{READY}", json.dumps({"published": 0, "files": files}).encode())
    assert repository.versions() == [1, 2]
    with pytest.raises(UserError) as e:
        repository.local_folder(2)
    assert str(e.value) == f"{folder}/{READY}: names {escape[:100]!r}, outside the version"
    assert not (tmp_path / "planted.txt").exists()
    assert (repository.local_folder(1) / "model.txt").read_text() == "a"


def test_decisions_are_lines_of_one_object(s3):
    fs, url = s3
    repository = open_repository(url, NAME)
    repository.append_decision({"published": True, "version": 1})
    repository.append_decision({"published": False})
    text = fs.cat_file(f"{url}/{NAME}/promotions.jsonl").decode()
    assert text == '{"published": true, "version": 1}\n{"published": false}\n'
    assert repository.decisions() == [{"published": True, "version": 1}, {"published": False}]
    # Copied from a folder where a crash tore its last line: the next decision is a line of its own.
    fs.pipe_file(f"{url}/{NAME}/promotions.jsonl", text.encode() + b'{"published": fa')
    repository.append_decision({"published": True, "version": 2})
    assert repository.decisions()[-1] == {"published": True, "version": 2}


def test_a_url_with_credentials_is_refused_without_repeating_them(s3):
    with pytest.raises(UserError, match="must not hold a password") as error:
        open_repository(f"s3://user:hunter2@{BUCKET}/repo", NAME)
    assert "hunter2" not in str(error.value)


def test_serve_swaps_to_a_new_version_and_never_a_half_uploaded_one(s3, programs, expected):  # noqa: F811
    fs, url = s3
    repository = open_repository(url, NAME)
    repository.publish(copying(programs[0]), keep=None)
    app = create_app(None, repository=url, model_name=NAME)
    versions = app.state.versions
    assert versions.current.version == 1
    # Version 2 half uploaded: every file but READY.
    for path in sorted(p for p in programs[2].rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{url}/{NAME}/2/{path.relative_to(programs[2]).as_posix()}")
    versions.refresh()
    assert versions.current.version == 1
    repository.publish(copying(programs[1]), keep=None)  # version 3
    versions.refresh()
    assert versions.current.version == 3
    assert json.loads((versions.current.folder / MANIFEST).read_text())["checkpoint"]["step"] == 11
    with serving(app) as base, httpx.Client() as client:
        version, scores = rank(client, base)
        assert version == "3"
        np.testing.assert_allclose(scores, expected[1], rtol=1e-5, atol=1e-6)
        assert "heavyranker_model_version 3.0" in client.get(f"{base}/metrics").text
    versions.stop()
    assert repository.served_versions() == []


def test_the_export_command_publishes_to_object_storage(s3, exported: Exported, monkeypatch, capsys):
    _, url = s3
    monkeypatch.setenv(ENV_VAR, ENV_VALUE)
    config = exported.folder.parent / "local_small.yaml"
    sets = [arg for value in OVERRIDES for arg in ("--set", value)]
    command = ["export", "--config", str(config), *sets, "--checkpoint", str(exported.checkpoint)]
    command += ["--format", "pt2", "--repository", url, "--model-name", NAME, "--keep-versions", "1"]
    capsys.readouterr()
    assert main(command) == 0 and main(command) == 0
    assert capsys.readouterr().out.splitlines() == [f"{url}/{NAME}/{v}" for v in (1, 2)]
    repository = open_repository(url, NAME)
    assert repository.versions() == [2]
    manifest = json.loads((repository.local_folder(2) / MANIFEST).read_text())
    original = json.loads((exported.folder / MANIFEST).read_text())
    assert manifest["program_sha256"] == original["program_sha256"]
