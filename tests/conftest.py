import errno
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# LightGBM's threads (demo/baselines.py), in this process and the benches' subprocesses: one per test worker.
os.environ["HEAVYRANKER_LIGHTGBM_THREADS"] = "1"
# A byte-for-byte copy of the reference implementation's local_prod.yaml (shared/reference/).
REFERENCE_YAML = REPO / "tests" / "fixtures" / "reference_local_prod.yaml"


@pytest.fixture
def small_config_path() -> Path:
    return CONFIGS / "local_small.yaml"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # `cache: true` without cache_dir writes under $HEAVYRANKER_CACHE: never the user's own cache folder.
    monkeypatch.setenv("HEAVYRANKER_CACHE", str(tmp_path_factory.getbasetemp() / "decoded-cache"))


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores, tests in parallel: keep torch from oversubscribing.
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


SMALL_SPLITS = ("validation", "validation_downsampled")


def small_config(data_dir: Path, save_dir: Path, *overrides: str):
    """configs/local_small.yaml reading the data generated under data_dir and writing to save_dir."""
    from heavyranker.config import load_config

    paths = [f"train_data.inputs={data_dir}/train/*.gz", f"training.save_dir={save_dir}"]
    paths += [f"validation_data.{s}.inputs={data_dir}/{s}/*.gz" for s in SMALL_SPLITS]
    return load_config(CONFIGS / "local_small.yaml", [*paths, *overrides])


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """Planted-truth data for local_small (4,000 training rows in 4 files), generated once per worker."""
    from heavyranker.config import load_config
    from heavyranker.data.synthetic import generate_for_config

    out = tmp_path_factory.mktemp("small_data")
    generate_for_config(
        load_config(CONFIGS / "local_small.yaml"), out=str(out), examples=4000, files=4, seed=0
    )
    return out


class FullDisk:
    """A file on a disk with `room` bytes free: the write that does not fit writes what fits, then fails
    as the OS's write does (for torch.save, which takes any object with a write method)."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name: str):
        return getattr(self.file, name)
