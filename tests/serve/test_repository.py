"""The model repository: versions appear whole and numbered, a half-written one is never listed, retention
keeps the newest K and what servers serve, decisions append one line each."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.serve.repository import (
    DELETING,
    MARKER_TTL_S,
    NUMBERING_LOCK,
    READY,
    STAGING,
    STAGING_TTL_S,
    TRITON_CONFIG,
    ModelRepository,
    export_version,
)
from heavyranker.serve.scorer import MANIFEST
from tests.serve.conftest import ENV_VALUE, ENV_VAR, OVERRIDES, Exported


def writing(text: str):
    def write(folder: Path) -> None:
        (folder / "model.txt").write_text(text)
        (folder / TRITON_CONFIG).write_text(f"config of {text}\n")

    return write


def test_versions_are_numbered_from_one_and_complete(tmp_path):
    repository = ModelRepository(tmp_path / "repo", "ranker")
    assert repository.versions() == [] and repository.newest() is None
    assert [repository.publish(writing(t), keep=None) for t in "ab"] == [1, 2]
    assert repository.versions() == [1, 2]
    assert (repository.version_folder(2) / "model.txt").read_text() == "b"
    assert (repository.version_folder(2) / READY).is_file()
    # The model's config.pbtxt is the newest version's; nothing else is left in the model's folder but the
    # numbering lock (hidden, and not a number: Triton passes it over).
    assert (repository.folder / TRITON_CONFIG).read_text() == "config of b\n"
    assert sorted(os.listdir(repository.folder)) == [NUMBERING_LOCK, "1", "2", TRITON_CONFIG]


def test_a_folder_without_its_marker_is_not_a_version_and_its_number_is_not_reused(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")
    repository.publish(writing("a"), keep=None)
    (repository.folder / "2").mkdir()  # being uploaded to an object store: READY comes last
    (repository.folder / "2" / "model.txt").write_text("half")
    assert repository.versions() == [1]
    assert repository.publish(writing("c"), keep=None) == 3
    assert repository.versions() == [1, 3]


@pytest.mark.parametrize("name", ["\u00b2", "\u0661"])
def test_a_folder_named_by_a_digit_that_is_not_ascii_is_not_a_version(tmp_path, name):
    # str.isdigit() takes both: int() refused the first (every listing failed) and read the second as 1.
    repository = ModelRepository(tmp_path, "ranker")
    (repository.folder / name).mkdir(parents=True)
    (repository.folder / name / READY).write_text("{}")
    assert repository.versions() == []
    assert repository.publish(writing("a"), keep=None) == 1
    assert repository.versions() == [1] and (repository.version_folder(1) / "model.txt").read_text() == "a"
    assert (repository.folder / name / READY).is_file()  # not anyone's to remove


def test_a_failed_write_leaves_no_version_and_no_staging_folder(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")

    def failing(folder: Path) -> None:
        (folder / "model.txt").write_text("partial")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        repository.publish(failing)
    assert repository.versions() == [] and os.listdir(repository.folder) == []


def test_retention_keeps_the_newest_k_the_protected_and_the_served(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")
    for text in "abcdef":
        repository.publish(writing(text), keep=None)
    repository.mark_served(2)
    assert repository.prune(2, protect=[1]) == [3, 4]
    assert repository.versions() == [1, 2, 5, 6]
    assert not any(name.startswith(".deleting") for name in os.listdir(repository.folder))


PUBLISHER = """
import json, sys
from heavyranker.serve.repository import ModelRepository
repository = ModelRepository(sys.argv[1], "ranker")
published = []
for i in range(int(sys.argv[2])):
    published.append(repository.publish(lambda folder: (folder / "model.txt").write_text(str(i)), keep=2))
    repository.append_decision({"published": True, "version": published[-1]})
print(json.dumps(published))
"""


def test_publishers_at_once_get_distinct_numbers_and_retention_keeps_the_newest(tmp_path):
    # Retention listed the versions twice: one published between the listings, newer than every kept one,
    # was removed, and its number given again to the next publisher; and a version another publisher's
    # retention had removed first was a FileNotFoundError after publishing, so promote recorded no decision.
    each = 30
    processes = [
        subprocess.Popen([sys.executable, "-c", PUBLISHER, str(tmp_path), str(each)], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [process.communicate()[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0]
    published = sorted(v for output in outputs for v in json.loads(output))
    assert published == list(range(1, 3 * each + 1))
    repository = ModelRepository(tmp_path, "ranker")
    assert repository.versions() == [3 * each - 1, 3 * each]
    assert sorted(d["version"] for d in repository.decisions()) == published


class _SlowToNumber(ModelRepository):
    """A publisher descheduled between choosing its number and taking it: it lists the versions, then waits
    until `others_done` is set (or a few seconds, where they are waiting for it)."""

    def __init__(self, root: Path, others_done: threading.Event):
        super().__init__(root, "ranker")
        self.others_done = others_done

    def _numbered(self) -> list[int]:
        listed = super()._numbered()
        self.others_done.wait(timeout=3)
        self.others_done.set()  # once: a retry lists again at once
        return listed


def test_a_publisher_slow_to_take_its_number_does_not_take_a_removed_ones(tmp_path):
    # Met in the 3-process test on a loaded machine: a publisher listed the versions (newest 1) and chose 2;
    # meanwhile the others published 2, 3, 4 and retention (keep 2) removed 2; its rename then took the
    # free name 2, a second version 2, below the newest.
    ModelRepository(tmp_path, "ranker").publish(writing("first"), keep=2)
    others_done = threading.Event()
    slow = _SlowToNumber(tmp_path, others_done)
    with ThreadPoolExecutor(1) as pool:
        # No config.pbtxt: the threads' atomic writes of it would share a temporary (named by the pid).
        slow_version = pool.submit(slow.publish, lambda f: (f / "model.txt").write_text("slow"), keep=None)
        time.sleep(0.5)  # the slow publisher has listed by now, or lists after the others: either is correct
        others = [ModelRepository(tmp_path, "ranker").publish(writing(t), keep=2) for t in "abc"]
        others_done.set()
        version = slow_version.result()
    published = [1, version, *others]
    assert len(set(published)) == len(published)
    assert version > max(others) or version < min(others)  # in the order taken, never a removed number
    assert ModelRepository(tmp_path, "ranker").newest() == max(published)


STOPPED_PUBLISHER = """
import sys, time
from heavyranker.serve.repository import ModelRepository

def write(folder):
    (folder / "model.txt").write_text("half")
    print("writing", flush=True)
    time.sleep(600)

ModelRepository(sys.argv[1], "ranker").publish(write)
"""


def test_a_publisher_killed_half_way_leaves_no_version_and_its_leftovers_go(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")
    repository.publish(writing("a"))
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED_PUBLISHER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"
    process.kill()
    process.wait()
    (staging,) = repository.folder.glob(f"{STAGING}*")
    (repository.folder / f"{DELETING}1-0badc0de").mkdir()  # a retention stopped before its rmtree
    assert repository.versions() == [1]
    # A recent staging folder may be another publisher's, still writing: it stays.
    assert repository.publish(writing("b")) == 2
    assert staging.is_dir() and not (repository.folder / f"{DELETING}1-0badc0de").exists()
    old = time.time() - STAGING_TTL_S - 60
    os.utime(staging, (old, old))
    assert repository.publish(writing("c")) == 3
    assert sorted(os.listdir(repository.folder)) == [NUMBERING_LOCK, "1", "2", "3", TRITON_CONFIG]


def test_a_stale_server_marker_protects_nothing(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")
    for text in "abc":
        repository.publish(writing(text), keep=None)
    marker = repository.mark_served(1)
    old = time.time() - MARKER_TTL_S - 1
    os.utime(marker, (old, old))
    assert repository.served_versions() == []
    repository.publish(writing("d"), keep=2)
    assert repository.versions() == [3, 4]


def test_decisions_append_one_line_each(tmp_path):
    repository = ModelRepository(tmp_path, "ranker")
    repository.append_decision({"published": True, "version": 1})
    repository.append_decision({"published": False})
    lines = (repository.folder / "promotions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"published": True, "version": 1}, {"published": False}]
    assert repository.decisions() == [json.loads(line) for line in lines]


def test_a_decision_after_a_torn_line_is_a_line_of_its_own(tmp_path, caplog):
    # A promoter killed as it wrote left half a line: the next decision was glued to it, and decisions()
    # failed on the whole file.
    repository = ModelRepository(tmp_path, "ranker")
    repository.append_decision({"published": True, "version": 1})
    with open(repository.folder / "promotions.jsonl", "a") as f:
        f.write('{"published": fa')
    repository.append_decision({"published": False})
    lines = (repository.folder / "promotions.jsonl").read_text().split("\n")
    assert lines == ['{"published": true, "version": 1}', '{"published": fa', '{"published": false}', ""]
    with caplog.at_level(logging.WARNING, logger="heavyranker.serve.repository"):
        assert repository.decisions() == [{"published": True, "version": 1}, {"published": False}]
    assert caplog.messages == [
        f"{repository.folder / 'promotions.jsonl'}:2: not a JSON line (torn by a crash?), skipped: "
        '{"published": fa'
    ]


def test_a_repository_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    # A file where the repository should be (as a read-only file system or a missing permission): it was a
    # NotADirectoryError with a traceback from export, promote and a training run's promotion.
    (tmp_path / "repo").write_text("not a folder")
    repository = ModelRepository(tmp_path / "repo", "ranker")
    message = f"{tmp_path / 'repo' / 'ranker'}: cannot write to the repository: Not a directory"
    with pytest.raises(UserError) as e:
        repository.publish(writing("a"))
    assert str(e.value) == message
    with pytest.raises(UserError) as e:
        repository.append_decision({"published": False})
    assert str(e.value) == message


@pytest.mark.parametrize("name", ["", "a/b", ".hidden"])
def test_a_model_name_that_is_not_a_folder_name_is_refused(tmp_path, name):
    with pytest.raises(UserError, match="model name"):
        ModelRepository(tmp_path, name)


def test_export_adds_the_checkpoints_export_as_the_next_version(tmp_path, exported: Exported):
    repository = ModelRepository(tmp_path, "ranker")
    version = export_version(repository, exported.config, checkpoint=str(exported.checkpoint), format="pt2")
    assert version == 1 and repository.versions() == [1]
    manifest = json.loads((repository.version_folder(1) / MANIFEST).read_text())
    original = json.loads((exported.folder / MANIFEST).read_text())
    assert manifest["program_sha256"] == original["program_sha256"]


def test_the_export_command_adds_versions_and_keeps_the_newest(
    tmp_path, exported: Exported, monkeypatch, capsys
):
    monkeypatch.setenv(ENV_VAR, ENV_VALUE)
    config = exported.folder.parent / "local_small.yaml"  # the fixture's YAML
    sets = [arg for value in OVERRIDES for arg in ("--set", value)]
    command = ["export", "--config", str(config), *sets, "--checkpoint", str(exported.checkpoint)]
    command += [
        "--format",
        "pt2",
        "--repository",
        str(tmp_path),
        "--model-name",
        "ranker",
        "--keep-versions",
        "1",
    ]
    capsys.readouterr()
    assert main(command) == 0 and main(command) == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "ranker" / str(v)) for v in (1, 2)]
    assert ModelRepository(tmp_path, "ranker").versions() == [2]


def test_the_export_command_publishes_the_precisions_it_is_given(tmp_path, exported: Exported, monkeypatch):
    """--precision and --table-precision reach a repository's version as they reach --out's folder."""
    monkeypatch.setenv(ENV_VAR, ENV_VALUE)
    config = exported.folder.parent / "local_small.yaml"
    sets = [arg for value in OVERRIDES for arg in ("--set", value)]
    command = ["export", "--config", str(config), *sets, "--checkpoint", str(exported.checkpoint)]
    command += ["--precision", "int8", "--table-precision", "int8", "--repository", str(tmp_path)]
    assert main([*command, "--model-name", "ranker"]) == 0
    manifest = json.loads((ModelRepository(tmp_path, "ranker").version_folder(1) / MANIFEST).read_text())
    assert (manifest["precision"], manifest["table_precision"]) == ("int8", "int8")
