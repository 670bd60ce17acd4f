"""A server that runs for days while versions are published every few minutes: what it holds stays bounded
(listings, records and downloads of versions long gone are let go), and what goes wrong meanwhile (a store
that goes away mid-download) leaves it serving the version it has. bench/serve_soak.py measures the
process's memory, descriptors and threads over many swaps."""

from __future__ import annotations

import fsspec

from heavyranker.serve.object_repository import CLAIM, ObjectRepository
from heavyranker.serve.repository import open_repository
from tests.serve.test_hot_swap import NAME
from tests.serve.test_object_repository import s3, server, writing  # noqa: F401 (fixtures)


def publisher(url: str) -> ObjectRepository:
    """The repository as another process (a training loop) publishes into it: its own file system, with
    its own listing cache, not the server's."""
    repository = ObjectRepository(url, NAME)
    repository.fs = fsspec.filesystem("s3", skip_instance_cache=True)
    return repository


def test_a_version_listed_while_only_its_claim_was_there_is_seen_once_complete(s3):  # noqa: F811
    fs, url = s3
    served = open_repository(url, NAME)
    claim = f"{served._path}/1/{CLAIM}other-publisher"
    fs.pipe_file(claim, b"")  # a publisher holds number 1 and uploads its files
    assert served.versions() == []
    other = publisher(url)
    other.fs.rm_file(claim)
    assert other.publish(writing("a"), keep=None) == 1
    assert served.versions() == [1]


def test_the_listing_cache_holds_only_the_versions_there(s3):  # noqa: F811
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


def test_the_ready_records_held_are_those_of_the_versions_there(s3):  # noqa: F811
    fs, url = s3
    served = open_repository(url, NAME)
    other = publisher(url)
    for text in "abcdefgh":
        other.publish(writing(text), keep=2)  # retention in the publisher: the server only lists
        served.versions()
    assert sorted(served._ready) == [7, 8]
