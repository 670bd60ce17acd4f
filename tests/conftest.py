import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture
def small_config_path() -> Path:
    return CONFIGS / "local_small.yaml"


@pytest.fixture(autouse=True)
def _quiet_threads():
    # Two cores, tests in parallel: keep torch from oversubscribing.
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
