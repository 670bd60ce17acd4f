"""The newest training data's time goes from the checkpoint into export's manifest.json, and /metrics
reports the seconds since it for the served version (NaN for a model exported without it)."""

from __future__ import annotations

import json
import math
import time

import httpx

from heavyranker.checkpoint import load_checkpoint, save_checkpoint
from heavyranker.serve.app import create_app
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import MANIFEST
from tests.serve.conftest import Exported, serving
from tests.serve.test_metrics import scrape

PLANTED = 1_700_000_000.0


def staleness(app) -> float:
    with serving(app) as url, httpx.Client(base_url=url) as client:
        [sample] = scrape(client)["heavyranker_model_data_staleness_seconds"]
    return sample.value


def test_the_data_time_reaches_the_manifest_and_the_metrics(exported: Exported, tmp_path):
    state = load_checkpoint(exported.checkpoint)
    state["newest_data_time"] = PLANTED
    checkpoint = save_checkpoint(tmp_path / "run", state["step"], state)
    out = str(tmp_path / "model")
    folder = export_model(exported.config, checkpoint=str(checkpoint), out=out, format="pt2")
    assert json.loads((folder / MANIFEST).read_text())["newest_data_time"] == PLANTED
    app = create_app(folder)
    before = time.time()
    seconds = staleness(app)
    after = time.time()
    assert before - PLANTED <= seconds <= after - PLANTED


def test_a_model_without_a_data_time_reports_nan(exported: Exported):
    assert json.loads((exported.folder / MANIFEST).read_text())["newest_data_time"] is None
    assert math.isnan(staleness(create_app(exported.folder)))
