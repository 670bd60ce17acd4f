"""Data in object storage: s3:// URLs read from a real S3-compatible server (moto's, started here on
loopback) give the batches the local read of the same files gives; dropped connections are retried from the
byte reached; what cannot be read is one line naming it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import fsspec
import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer

from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.config.data import ExplicitDateInputs
from heavyranker.data import storage
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.sources.files import date_files, glob_files
from heavyranker.data.sources.tfrecord import read_records
from heavyranker.errors import DataError, UserError
from tests.conftest import CONFIGS, REPO, small_config
from tests.data.test_dataset import data_config
from tests.data.test_parquet import write_parquet

BUCKET = "data"
TRAINING = {"shuffle": True, "repeat": True, "drop_last": True}


@contextlib.contextmanager
def s3_endpoint(url: str) -> Iterator[None]:
    """s3fs pointed at `url` (as a user would: AWS_ENDPOINT_URL), with fresh instances before and after."""
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3-compatible server (moto) on loopback while the block runs: its URL."""
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def server(small_data) -> Iterator[str]:
    """The S3 server's URL, with small_data's train files under s3://data/train/."""
    with moto_server() as url:
        with s3_endpoint(url):
            fs = fsspec.filesystem("s3")
            fs.mkdir(BUCKET)
            fs.put(str(small_data / "train" / "*.gz"), f"{BUCKET}/train/")
        yield url


@pytest.fixture
def s3(server) -> Iterator[fsspec.AbstractFileSystem]:
    with s3_endpoint(server):
        yield fsspec.filesystem("s3")


def assert_same_batches(got, expected) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.tasks == b.tasks and a.features.keys() == b.features.keys()
        for name in a.features:
            assert torch.equal(a.features[name], b.features[name]), name
        assert torch.equal(a.labels, b.labels) and torch.equal(a.weights, b.weights)


def test_s3_batches_are_the_local_batches(s3, small_data, tmp_path):
    config = small_config(small_data, tmp_path)
    local = str(small_data / "train" / "*.gz")
    remote = f"s3://{BUCKET}/train/*.gz"
    batches = 20  # past the end of the first epoch (2,000 rows per rank in batches of 128)
    for rank in (0, 1):
        common = {"seed": 7, "rank": rank, "world_size": 2, **TRAINING}
        with RecapDataset(config.train_data, inputs=local, **common) as dataset:
            expected = list(islice(dataset, batches))
            local_files = dataset.files
        with RecapDataset(config.train_data, inputs=remote, **common) as dataset:
            assert [Path(f).name for f in dataset.files] == [Path(f).name for f in local_files]
            assert all(f.startswith(f"s3://{BUCKET}/train/") for f in dataset.files)
            assert_same_batches(list(islice(dataset, batches)), expected)
            dataset.skip_to(13)  # a resumed run starts where the uninterrupted one was
            assert_same_batches(list(islice(dataset, 3)), expected[13:16])


def test_dated_folders_in_a_bucket(s3):
    for path in ("dated/2023/01/03/b.gz", "dated/2023/01/03/a.gz", "dated/2023/01/01/c.gz"):
        s3.pipe(f"{BUCKET}/{path}", b"x")
    s3.pipe(f"{BUCKET}/dated/2023/01/03/_SUCCESS", b"")
    spec = ExplicitDateInputs(
        data_root=f"s3://{BUCKET}/dated", end_date="2023-01-03", days=3, num_missing_days_tol=1
    )
    root = f"s3://{BUCKET}/dated/2023/01"
    assert date_files(spec) == [f"{root}/01/c.gz", f"{root}/03/a.gz", f"{root}/03/b.gz"]
    with pytest.raises(UserError, match=rf"^1 of 2 days .*{root}/02.*allows 0$"):
        date_files(spec.model_copy(update={"days": 2, "num_missing_days_tol": 0}))


class DroppingProxy:
    """A TCP proxy on loopback to `target` that resets its first `drops` connections once they have carried
    `after` bytes from the server: a connection dropped mid-file."""

    def __init__(self, target: tuple[str, int], after: int, drops: int):
        self.target, self.after, self.drops = target, after, drops
        self.dropped = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        carried = 0
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                carried += len(data)
                if from_server and carried > self.after and self._drop():
                    sink.sendall(data[: len(data) // 2])
                    # Linger 0: closed with a reset, as by a failing network. shutdown first, as it
                    # also wakes the other direction's thread, blocked in recv on the same sockets.
                    for s in (source, sink):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _drop(self) -> bool:
        with self._lock:
            if self.dropped == self.drops:
                return False
            self.dropped += 1
            return True

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        for s in self._sockets:
            s.close()


def test_connections_dropped_mid_file_are_read_again(server, small_data):
    local = sorted((small_data / "train").glob("*.gz"))[0]
    expected = list(read_records(str(local)))
    host, port = server.removeprefix("http://").split(":")
    proxy = DroppingProxy((host, int(port)), after=100_000, drops=0)  # the files are ~300 KB
    try:
        with s3_endpoint(proxy.url):
            # One more drop than s3fs's own retries of a request: ours re-open the file and read on.
            proxy.drops = fsspec.filesystem("s3").retries + 1
            got = list(read_records(f"s3://{BUCKET}/train/{local.name}"))
    finally:
        proxy.close()
    assert proxy.dropped == proxy.drops
    assert got == expected


class FlakyFile:
    """A file that raises ConnectionResetError when a read reaches byte `at`, `failures` times in all
    (counted across re-opens by the shared list)."""

    def __init__(self, file, at: int, failures: list[int]):
        self._file, self._at, self._failures = file, at, failures

    def read(self, n: int) -> bytes:
        if self._failures[0] and self._file.tell() <= self._at < self._file.tell() + n:
            self._failures[0] -= 1
            self._file.read(n // 2)  # the connection broke after part of the bytes arrived
            raise ConnectionResetError("connection reset by peer")
        return self._file.read(n)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def flaky(monkeypatch, fs, at: int, failures: int) -> list[int]:
    """Remote files from `fs` that fail `failures` times at byte `at`; returns the failures left."""
    left = [failures]

    class FlakyFS:
        def open(self, url, mode, **kwargs):
            return FlakyFile(fs.open(url, mode, **kwargs), at, left)

    monkeypatch.setattr(storage, "filesystem", lambda url: FlakyFS())
    monkeypatch.setattr(storage, "BACKOFF", 0.001)
    return left


def test_a_failed_read_resumes_at_the_byte_reached(s3, small_data, monkeypatch):
    local = sorted((small_data / "train").glob("*.gz"))[1]
    left = flaky(monkeypatch, s3, at=250_000, failures=storage.TRIES - 1)
    assert list(read_records(f"s3://{BUCKET}/train/{local.name}")) == list(read_records(str(local)))
    assert left == [0]


def test_a_read_failing_every_try_names_url_and_record(s3, small_data, monkeypatch):
    local = sorted((small_data / "train").glob("*.gz"))[1]
    url = f"s3://{BUCKET}/train/{local.name}"
    flaky(monkeypatch, s3, at=250_000, failures=storage.TRIES)
    message = rf"^{url}: record \d+: unreadable \(.*ConnectionResetError: .*{storage.TRIES} tries\)\)$"
    with pytest.raises(DataError, match=message):
        list(read_records(url))
    flaky(monkeypatch, s3, at=250_000, failures=storage.TRIES)
    got, expected = list(read_records(url, ignore_errors=True)), list(read_records(str(local)))
    assert len(got) < len(expected) and got == expected[: len(got)]  # the file ends where reading failed


def test_a_file_replaced_between_reads_is_not_joined(s3, monkeypatch):
    url = f"s3://{BUCKET}/replaced"
    s3.pipe(url, bytes(40_000))
    monkeypatch.setattr(storage, "BLOCK_SIZE", 16_000)  # the third block is fetched after the replacement
    monkeypatch.setattr(storage, "BACKOFF", 0.001)
    with storage.open_binary(url) as f:
        assert f.read(1000) == bytes(1000)
        s3.pipe(url, b"x" * 40_000)
        with pytest.raises(storage.FileChanged, match="^the file was replaced while being read, at byte"):
            f.read(35_000)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (f"s3://{BUCKET}/nothing/*.gz", rf"^no files match inputs 's3://{BUCKET}/nothing/\*\.gz'$"),
        ("s3://no-such-bucket/*.gz", r"^no files match .*: the bucket 'no-such-bucket' does not exist$"),
        ("s3://key:secret@bucket/*.gz", r"^s3://bucket/\*\.gz: a URL must not hold a password"),
    ],
)
def test_what_matches_nothing_is_one_line(s3, pattern, message):
    with pytest.raises(UserError, match=message) as e:
        glob_files(pattern)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_a_missing_object_is_one_line(s3):
    with pytest.raises(
        DataError, match=rf"^s3://{BUCKET}/missing\.gz: record 0: unreadable \(FileNotFound"
    ) as e:
        list(read_records(f"s3://{BUCKET}/missing.gz"))
    assert "\n" not in str(e.value)


def test_a_back_end_not_installed_names_the_extra():
    with contextlib.suppress(ImportError):
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    with pytest.raises(UserError, match=r"^gs://b/\*\.gz: reading gs:// URLs needs .*'heavyranker\[gcs\]'$"):
        glob_files("gs://b/*.gz")


def test_config_keeps_urls_and_resolves_paths():
    config = load_config(CONFIGS / "local_small.yaml", ["train_data.inputs=s3://bucket/train/*.gz"])
    assert config.train_data.inputs == "s3://bucket/train/*.gz"
    assert config.validation_data["validation"].inputs == str(REPO / "data/local_small/validation/*.gz")


def test_s3_files_cached_locally_give_the_local_batches(s3, small_data, tmp_path):
    config = small_config(small_data, tmp_path)
    cached = config.train_data.model_copy(
        update={"cache": True, "cache_dir": str(tmp_path / "cache"), "cache_workers": 1}
    )
    with RecapDataset(config.train_data, seed=3, **TRAINING) as dataset:
        expected = list(islice(dataset, 40))  # more than two epochs
    remote = f"s3://{BUCKET}/train/*.gz"
    for _ in range(2):  # building the cache from the bucket, then reading it
        with RecapDataset(cached, inputs=remote, seed=3, **TRAINING) as dataset:
            assert_same_batches(list(islice(dataset, 40)), expected)
    assert len(list((tmp_path / "cache").iterdir())) == 4
    s3.pipe(f"{BUCKET}/train/part-00000.gz", s3.cat(f"{BUCKET}/train/part-00001.gz"))  # a new ETag
    try:
        with RecapDataset(cached, inputs=remote, seed=3, **TRAINING) as dataset:
            list(islice(dataset, 1))
        assert len(list((tmp_path / "cache").iterdir())) == 5
    finally:
        s3.put(str(small_data / "train" / "part-00000.gz"), f"{BUCKET}/train/part-00000.gz")


def test_no_permission_is_one_line(server, small_data):
    """A user without any policy, on a server that checks: listing and reading are denied."""
    import boto3
    import requests

    with s3_endpoint(server):
        iam = boto3.client("iam", endpoint_url=server, region_name="us-east-1")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
    requests.post(f"{server}/moto-api/reset-auth", data=b"0").raise_for_status()
    try:
        with s3_endpoint(server), pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            patch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            pattern = f"s3://{BUCKET}/train/*.gz"
            denied = rf"^cannot list inputs '{re.escape(pattern)}': PermissionError: Access Denied$"
            with pytest.raises(UserError, match=denied):
                glob_files(pattern)
            url = f"s3://{BUCKET}/train/{sorted(small_data.glob('train/*.gz'))[0].name}"
            forbidden = rf"^{url}: record 0: unreadable \(PermissionError: Forbidden\)$"
            with pytest.raises(DataError, match=forbidden):
                list(read_records(url))
    finally:
        requests.post(f"{server}/moto-api/reset-auth", data=b"inf").raise_for_status()


def test_importing_storage_makes_no_thread_pool():
    """The fetch threads' pool is made at the first remote read: a command that reads local files only (and
    every process the cache forks) carries none."""
    probe = (
        "import gc, threading\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "import heavyranker.data.storage\n"
        "pools = [o for o in gc.get_objects() if isinstance(o, ThreadPoolExecutor)]\n"
        "print(len(pools), threading.active_count())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["0", "1"]


SECRET = "S3CR3T"
URLS_WITH_CREDENTIALS = [
    f"s3://{SECRET}@bucket/train/*.gz",
    f"s3://KEYID:{SECRET}@bucket/train/*.gz",
    f"s3://KEYID%3A{SECRET}@bucket/train/*.gz",
    *(
        f"s3://bucket/train/*.gz?{key}={SECRET}"
        for key in (
            "X-Amz-Signature",
            "X-Amz-Credential",
            "X-Amz-Security-Token",
            "X-Goog-Signature",
            "sig",
            "Signature",
            "token",
        )
    ),
]


@pytest.mark.parametrize("door", ["config", "--inputs"])
@pytest.mark.parametrize("url", URLS_WITH_CREDENTIALS)
def test_a_url_with_credentials_is_refused_in_one_line_that_leaves_them_out(
    url, door, tmp_path, capsys, caplog
):
    """Through the config (any path field) or a command's own --inputs (storage refuses it)."""
    common = ["--config", str(CONFIGS / "local_small.yaml"), "--out", str(tmp_path / "out.npz")]
    if door == "config":
        argv = ["data", "dump", *common, "--set", f"train_data.inputs={url}"]
    else:
        argv = ["data", "dump", *common, "--inputs", url]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "a URL must not hold" in err
    assert SECRET not in out + err + caplog.text


@contextlib.contextmanager
def refusing_endpoint() -> Iterator[str]:
    """A loopback port bound but not listening: every connection to it is refused at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        with s3_endpoint(f"http://127.0.0.1:{bound.getsockname()[1]}"), pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries of a refused connection
            patch.setattr(storage, "BACKOFF", 0.001)  # ours
            yield f"s3://{BUCKET}/train"


def test_an_unreachable_endpoint_is_one_line_naming_the_url(tmp_path, capsys):
    with refusing_endpoint() as folder:
        argv = [
            "data",
            "stats",
            "--config",
            str(CONFIGS / "local_small.yaml"),
            "--out",
            str(tmp_path / "s.json"),
        ]
        assert main([*argv, "--set", f"train_data.inputs={folder}/*.gz"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot list inputs '{folder}/*.gz': EndpointConnectionError: ")
        assert err.count("\n") == 1
        with pytest.raises(OSError, match=r"^EndpointConnectionError: Could not connect") as e:
            storage.file_version(f"{folder}/part-00000.gz")
        assert "\n" not in str(e.value)
        unreadable = rf"^{folder}/x\.gz: record 0: unreadable \(OSError: EndpointConnectionError: "
        with pytest.raises(DataError, match=unreadable) as e:
            list(read_records(f"{folder}/x.gz"))
        assert "\n" not in str(e.value)


def test_parquet_in_a_bucket(s3, tmp_path):
    """Parquet files as s3:// URLs, in hive partitions (pyarrow reads the footer from the end of the storage
    layer's file): the local files' batches."""
    write_parquet(tmp_path, [10, 6, 3])
    for f in range(3):
        s3.put(str(tmp_path / f"part-{f}.parquet"), f"{BUCKET}/table/dt=2026-12-0{f + 1}/part-0.parquet")
    local = data_config(tmp_path, inputs=str(tmp_path / "*.parquet"))
    bucket = local.model_copy(update={"inputs": f"s3://{BUCKET}/table/dt=*/*.parquet"})
    assert_same_batches(
        list(islice(RecapDataset(bucket, **TRAINING), 8)), list(islice(RecapDataset(local, **TRAINING), 8))
    )


def test_convert_refuses_an_object_key_that_climbs_out_of_out(s3, small_data, tmp_path, capsys):
    # S3 keys are names, not paths: "dots/a/../../escape.gz" put the output two folders above --out.
    data = (small_data / "train" / "part-00000.gz").read_bytes()
    s3.pipe({f"{BUCKET}/dots/a/ok.gz": data, f"{BUCKET}/dots/a/../../escape.gz": data})
    out = tmp_path / "deep" / "out"
    argv = ["data", "convert", "--config", str(CONFIGS / "local_small.yaml"), "--to", "parquet"]
    assert main([*argv, "--inputs", f"s3://{BUCKET}/dots/**/*.gz", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: s3://{BUCKET}/dots/a/../../escape.gz: its name below the inputs' folder leads outside "
        f"--out {out}"
    )
    assert not list(tmp_path.rglob("*.parquet"))


def test_latest_in_a_bucket_lists_the_newest_branches_only(s3):
    for path in ("2023/12/31/a.gz", "2024/01/01/b.gz", "2024/01/02/_SUCCESS"):
        s3.pipe(f"{BUCKET}/latest/{path}", b"x")
    spec = ExplicitDateInputs(data_root=f"s3://{BUCKET}/latest", end_date="latest", days=2)
    root = f"s3://{BUCKET}/latest"
    assert date_files(spec) == [f"{root}/2023/12/31/a.gz", f"{root}/2024/01/01/b.gz"]
