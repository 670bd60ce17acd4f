"""A server that runs for days while versions are published every few minutes: what it holds stays bounded
(listings, records and downloads of versions long gone are let go), and what goes wrong meanwhile (a store
that goes away mid-download) leaves it serving the version it has. bench/serve_soak.py measures the
process's memory, descriptors and threads over many swaps."""

from __future__ import annotations

import gc
import itertools
import logging
import shutil
import socket
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
import httpx
import pytest
from moto.server import ThreadedMotoServer
from torch.fx import graph_module
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from heavyranker.serve import versions as versions_module
from heavyranker.serve.app import create_app
from heavyranker.serve.object_repository import CLAIM, ObjectRepository
from heavyranker.serve.repository import ModelRepository, open_repository
from heavyranker.serve.versions import ServedVersions
from tests.data.test_storage import s3_endpoint
from tests.serve.conftest import json_request, serving
from tests.serve.test_hot_swap import FEATURES, IDS, NAME, other_inputs, programs, publish, rank  # noqa: F401
from tests.serve.test_limits import BOUND_S, head, held_model, wait_until
from tests.serve.test_object_repository import writing


class Store:
    """moto's S3 server on loopback that a test can stop (the store goes away) and start again on the same
    port, with what it held (moto keeps its buckets in this process)."""

    def __init__(self):
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        self.host, self.port = self.moto.get_host_and_port()

    def go_away(self) -> None:
        self.moto.stop()

    def come_back(self) -> None:
        self.moto = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.moto.start()


@contextmanager
def store_that_goes_away(bucket: str) -> Iterator[tuple[Store, str]]:
    store = Store()
    try:
        with s3_endpoint(f"http://{store.host}:{store.port}"), pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's: the outage's failures come at once
            fsspec.filesystem("s3").mkdir(bucket)
            yield store, f"s3://{bucket}/repository"
    finally:
        store.go_away()


BUCKETS = itertools.count()  # moto keeps every bucket for the process's life, whichever server made it


@pytest.fixture
def s3() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """The file system and a repository's URL in a store of the test's own."""
    with store_that_goes_away(f"long-run-{next(BUCKETS)}") as (_, url):
        yield fsspec.filesystem("s3"), url


def going_away_after_one_file(monkeypatch: pytest.MonkeyPatch, repository: ObjectRepository, store: Store):
    """The store goes away once the first file of a download has arrived."""
    get_file = repository.fs.get_file

    def get_one_then_go_away(*args, **kwargs):
        get_file(*args, **kwargs)
        store.go_away()
        monkeypatch.undo()

    monkeypatch.setattr(repository.fs, "get_file", get_one_then_go_away)


def publisher(url: str) -> ObjectRepository:
    """The repository as another process (a training loop) publishes into it: its own file system, with
    its own listing cache, not the server's."""
    repository = ObjectRepository(url, NAME)
    repository.fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return repository


def test_a_version_listed_while_only_its_claim_was_there_is_seen_once_complete(s3):
    fs, url = s3
    served = open_repository(url, NAME)
    claim = f"{served._path}/1/{CLAIM}other-publisher"
    fs.pipe_file(claim, b"")  # a publisher holds number 1 and uploads its files
    assert served.versions() == []
    other = publisher(url)
    other.fs.rm_file(claim)
    assert other.publish(writing("a"), keep=None) == 1
    assert served.versions() == [1]


def test_the_listing_cache_holds_only_the_versions_there(s3):
    fs, url = s3
    served = open_repository(url, NAME)
    other = publisher(url)
    below = f"{served._path}/"
    cached = []
    for text in "abcdefgh":
        other.publish(writing(text), keep=2)
        served.versions()
        cached.append(sorted(p for p in served.fs.dircache if p.startswith(below)))
    # The two kept versions' folders, whatever the number published.
    assert cached[-1] == [f"{served._path}/7", f"{served._path}/8"]
    assert len(cached[1]) == len(cached[-1]) == 2


def test_the_ready_records_held_are_those_of_the_versions_there(s3):
    fs, url = s3
    served = open_repository(url, NAME)
    other = publisher(url)
    for text in "abcdefgh":
        other.publish(writing(text), keep=2)  # retention in the publisher: the server only lists
        served.versions()
    assert sorted(served._ready) == [7, 8]


def test_a_download_cut_by_the_store_going_away_leaves_nothing_on_disk(monkeypatch):
    with store_that_goes_away(f"long-run-{next(BUCKETS)}") as (store, url):
        served = open_repository(url, NAME)
        served.publish(writing("a"), keep=None)  # two files: model.txt, config.pbtxt
        going_away_after_one_file(monkeypatch, served, store)
        with pytest.raises(OSError):
            served.local_folder(1)
        assert list(served._cache.iterdir()) == []
        store.come_back()
        assert (served.local_folder(1) / "model.txt").read_text() == "a"
        assert [p.name.split("-")[0] for p in served._cache.iterdir()] == ["1"]


def test_the_failed_versions_held_are_those_still_there(tmp_path, programs):  # noqa: F811
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    versions = ServedVersions.from_repository(repository)
    for attempt in range(3):  # each fails (its inputs differ) and is removed (a rollback)
        failing = publish(repository, other_inputs(programs[1], tmp_path / f"other{attempt}"))
        versions.refresh()
        assert versions.failed_versions == [failing]
        shutil.rmtree(repository.version_folder(failing))
    assert repository.versions() == [1] and versions.current.version == 1
    versions.refresh()
    assert versions.failed_versions == []


def test_a_version_the_store_cut_off_serves_once_it_is_back(programs, monkeypatch, caplog):  # noqa: F811
    with store_that_goes_away(f"long-run-{next(BUCKETS)}") as (store, url):
        repository = open_repository(url, NAME)
        publish(repository, programs[0])
        versions = ServedVersions.from_repository(repository)
        publish(repository, programs[1])
        going_away_after_one_file(monkeypatch, repository, store)
        with caplog.at_level(logging.INFO, logger="heavyranker.serve.versions"):
            versions.poll()  # the download cut half way
            versions.poll()  # the store away
            versions.poll()
            assert versions.current.version == 1 and versions.failed_versions == []
            store.come_back()
            versions.poll()
        assert versions.current.version == 2
        lines = [r.getMessage() for r in caplog.records if r.name == "heavyranker.serve.versions"]
        assert len(lines) == 5, lines
        assert lines[0].startswith("cannot fetch version 2 (") and lines[0].endswith("): keeping version 1")
        assert lines[1].startswith(f"polling {url}/{NAME} failed (") and lines[1].endswith("version 1")
        assert lines[2:] == [
            "polling the repository works again: serving version 1",
            "now serving version 2 (was 1)",
            "fetching a version works again: serving version 2",
        ]


def test_a_version_swapped_out_is_let_go_with_its_generated_sources(tmp_path, programs):  # noqa: F811
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    versions = ServedVersions.from_repository(repository)
    publish(repository, programs[1])
    versions.refresh()  # the first swap may fill torch's own caches, which stay
    gc.collect()
    sources = len(graph_module._loader.eval_cache)  # torch's own and the served version's
    shape_envs = count_shape_envs()
    swapped_out = []
    for folder in programs * 2:
        swapped_out.append(weakref.ref(versions.current.scorer.program))
        publish(repository, folder)
        versions.refresh()
    gc.collect()
    assert versions.current.version == 8
    assert [program() for program in swapped_out] == [None] * 6
    assert len(graph_module._loader.eval_cache) == sources  # those of the versions swapped out went too
    # torch.export.load makes one a program, which the lru_caches on ShapeEnv's methods held for good.
    assert count_shape_envs() == shape_envs


def count_shape_envs() -> int:
    gc.collect()
    return sum(type(o) is ShapeEnv for o in gc.get_objects())  # isinstance: deprecation warnings


@contextmanager
def automatic_collection_off() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_version_swapped_out_is_freed_at_once_and_its_memory_handed_back(tmp_path, programs, monkeypatch):  # noqa: F811
    """A torch program is cyclic garbage, which Python's own collections freed late: a server held versions
    swapped out long after; and what it freed stayed in glibc's heap (memory.return_freed_memory)."""
    returned = []  # for each hand-back, whether the version swapped out was freed by then

    def hand_back() -> None:
        returned.append(gone() is None)

    monkeypatch.setattr(versions_module, "return_freed_memory", hand_back, raising=False)
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    versions = ServedVersions.from_repository(repository)
    gone = weakref.ref(versions.current.scorer.program)
    with automatic_collection_off():
        publish(repository, programs[1])
        versions.refresh()
        assert gone() is None and returned == [True]
        in_flight = versions.current.scorer  # a request still scoring on version 2 as version 3 swaps in
        gone = weakref.ref(in_flight.program)
        publish(repository, programs[2])
        versions.refresh()
        assert gone() is not None and returned == [True]
        del in_flight  # the request ends: the next poll frees it
        versions.poll()
        assert gone() is None and returned == [True, True]


@contextmanager
def served_then_swapped(
    tmp_path: Path, folders: list[Path]
) -> Iterator[tuple[httpx.Client, str, weakref.ref]]:
    """A server that answered a request on version 1 and then swapped in version 2: a client, the server's
    URL and a weak reference to version 1's program."""
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, folders[0])
    app = create_app(None, repository=str(repository.root), model_name=NAME)
    first = weakref.ref(app.state.versions.current.scorer.program)
    with serving(app) as url, httpx.Client() as client:
        assert rank(client, url)[0] == "1"
        publish(repository, folders[1])
        app.state.versions.refresh()
        yield client, url, first


def test_an_idle_server_lets_go_of_the_version_it_swapped_out(tmp_path, programs):  # noqa: F811
    """The batcher's thread held the last batch it scored, and so its version, until the next request."""
    with served_then_swapped(tmp_path, programs) as (_, _, first):
        # Its answer may reach the client before the batcher's thread is back to waiting for the next.
        wait_until(lambda: gc.collect() >= 0 and first() is None, "version 1 is still held")


def test_a_server_lets_go_of_its_first_version_once_swapped_out(tmp_path, programs):  # noqa: F811
    with served_then_swapped(tmp_path, programs) as (client, url, first):
        assert rank(client, url)[0] == "2"
        gc.collect()
        assert first() is None


def test_requests_given_up_during_a_swap_leave_nothing_queued(tmp_path, programs):  # noqa: F811
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    app = create_app(None, repository=str(repository.root), model_name=NAME, max_queue=4)
    limits, batcher = app.state.limits, app.state.batcher
    with held_model(app.state.versions.current.scorer) as (entered, release):
        with serving(app) as url, httpx.Client() as client:
            address = urlsplit(url)
            body = json_request(IDS, FEATURES)
            for _ in range(3):  # each sends a whole request, then closes its connection without an answer
                with socket.create_connection((address.hostname, address.port)) as connection:
                    connection.sendall(head(len(body)) + body)
                    if not entered.is_set():
                        assert entered.wait(BOUND_S), "the first request did not reach the model"
            wait_until(lambda: limits.admitted == 3, "the requests were not admitted")
            publish(repository, programs[1])
            app.state.versions.refresh()
            release.set()
            wait_until(lambda: limits.admitted == 0, "the requests given up still hold their places")
            assert batcher.waiting == 0
            assert rank(client, url)[0] == "2"
