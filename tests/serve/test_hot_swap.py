"""`serve --repository`: the newest complete version serves, newer ones swap in under load without a failed
request, each response names the version that scored it (with that version's scores), and a version that
cannot serve (damaged, other inputs) is skipped while the served one goes on, as it does when the
repository is deleted."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from heavyranker.checkpoint import save_checkpoint
from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.serve.app import create_app
from heavyranker.serve.export import export_model
from heavyranker.serve.repository import ModelRepository
from heavyranker.serve.scorer import MANIFEST, Scorer
from tests.serve.conftest import SHAPES, Exported, json_request, random_features, serving

NAME = "ranker"
JSON = {"content-type": "application/json"}
IDS = list(range(5))
FEATURES = random_features(SHAPES, len(IDS), seed=3)


@pytest.fixture(scope="module")
def programs(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three exported folders of different weights: the fixture's and two with noise added to it."""
    root = tmp_path_factory.mktemp("programs")
    folders = [exported.folder]
    for seed in (1, 2):
        gen = torch.Generator().manual_seed(seed)
        state = {
            k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in exported.model.state_dict().items()
        }
        checkpoint = save_checkpoint(root / f"run{seed}", 10 + seed, {"model": state, "step": 10 + seed})
        out = root / f"model{seed}"
        folders.append(export_model(exported.config, checkpoint=str(checkpoint), out=str(out), format="pt2"))
    return folders


@pytest.fixture(scope="module")
def expected(programs: list[Path]) -> list[np.ndarray]:
    """Each program's scores of FEATURES, scored alone, in IDS order."""
    features = {name: torch.from_numpy(values) for name, values in FEATURES.items()}
    return [Scorer(folder)(features)[1].numpy() for folder in programs]


def publish(repository: ModelRepository, folder: Path) -> int:
    return repository.publish(lambda staging: shutil.copytree(folder, staging, dirs_exist_ok=True), keep=None)


def rank(client: httpx.Client, url: str) -> tuple[str, np.ndarray]:
    body = json_request(IDS, FEATURES)
    response = client.post(f"{url}/v1/rank", content=body, headers=JSON, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    scores = {c["id"]: c["score"] for c in body["candidates"]}
    return body["model_version"], np.array([scores[i] for i in IDS], np.float32)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_versions_swap_in_under_load_without_a_failed_request(tmp_path, programs, expected):
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    app = create_app(None, repository=str(repository.root), model_name=NAME, poll_seconds=0.05)
    answers: list[tuple[str, np.ndarray]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client_loop(url: str) -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                try:
                    answers.append(rank(client, url))
                except BaseException as e:  # noqa: BLE001 - every failure is counted and reported
                    failures.append(e)
                    return

    with serving(app) as url:
        client = threading.Thread(target=client_loop, args=(url,))
        client.start()
        try:
            for version in range(2, 12):
                assert publish(repository, programs[(version - 1) % 3]) == version
                # Each version answers before the next is published: all ten are seen.
                wait_for(lambda v=str(version): failures or (answers and answers[-1][0] == v), f"v{version}")
        finally:
            stop.set()
            client.join()
        metrics = httpx.get(f"{url}/metrics").text
    assert failures == []
    versions = [int(v) for v, _ in answers]
    assert versions == sorted(versions) and set(versions) == set(range(1, 12))
    for version, scores in answers:
        np.testing.assert_allclose(scores, expected[(int(version) - 1) % 3], rtol=1e-5, atol=1e-6)
    assert "heavyranker_model_version 11.0" in metrics
    assert "heavyranker_model_swaps_total 10.0" in metrics


def damaged(folder: Path, out: Path) -> Path:
    shutil.copytree(folder, out)
    program = out / json.loads((out / MANIFEST).read_text())["program"]
    content = bytearray(program.read_bytes())
    content[len(content) // 2] ^= 0xFF
    program.write_bytes(bytes(content))
    return out


def other_inputs(folder: Path, out: Path) -> Path:
    """The folder with a manifest whose continuous input is one value narrower: another model's layout."""
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["inputs"][0]["shape"] = [manifest["inputs"][0]["shape"][0] - 1]
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("make, why", [(damaged, "content hash"), (other_inputs, "inputs differ")])
def test_a_version_that_cannot_serve_is_skipped_and_logged(tmp_path, programs, expected, caplog, make, why):
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    app = create_app(None, repository=str(repository.root), model_name=NAME)
    versions = app.state.versions
    publish(repository, make(programs[1], tmp_path / "bad"))
    with caplog.at_level(logging.ERROR, logger="heavyranker.serve.versions"):
        versions.refresh()
        versions.refresh()  # tried once, not at every poll
    assert versions.current.version == 1
    assert [r.getMessage() for r in caplog.records if why in r.getMessage()] and len(caplog.records) == 1
    assert "version 2 cannot be served" in caplog.records[0].getMessage()
    publish(repository, programs[2])
    versions.refresh()
    assert versions.current.version == 3
    # The newest version removed: back to the newest that serves, past the damaged one.
    shutil.rmtree(repository.version_folder(3))
    versions.refresh()
    assert versions.current.version == 1
    with serving(app) as url, httpx.Client() as client:
        version, scores = rank(client, url)
        assert version == "1"
        np.testing.assert_allclose(scores, expected[0], rtol=1e-5, atol=1e-6)
        assert "heavyranker_model_failed_loads_total 1.0" in client.get(f"{url}/metrics").text


def test_a_server_started_while_the_newest_version_is_damaged_serves_the_one_below(
    tmp_path, programs, expected, caplog
):
    # It refused to start: a restart after a damaged publish took the service down while version 1 was good.
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    publish(repository, damaged(programs[1], tmp_path / "bad"))
    with caplog.at_level(logging.ERROR, logger="heavyranker.serve.versions"):
        app = create_app(None, repository=str(repository.root), model_name=NAME)
        app.state.versions.refresh()  # not tried again
    versions = app.state.versions
    assert versions.current.version == 1 and versions.failed_versions == [2]
    assert len(caplog.records) == 1 and "version 2 cannot be served" in caplog.records[0].getMessage()
    assert "content hash" in caplog.records[0].getMessage()
    with serving(app) as url, httpx.Client() as client:
        version, scores = rank(client, url)
        assert version == "1"
        np.testing.assert_allclose(scores, expected[0], rtol=1e-5, atol=1e-6)
        assert "heavyranker_model_failed_loads_total 1.0" in client.get(f"{url}/metrics").text
    publish(repository, programs[2])
    versions.refresh()
    assert versions.current.version == 3


def test_a_repository_whose_every_version_is_damaged_is_refused_naming_each(tmp_path, programs):
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, damaged(programs[0], tmp_path / "bad0"))
    publish(repository, other_manifest(programs[1], tmp_path / "bad1"))
    with pytest.raises(UserError) as e:
        create_app(None, repository=str(repository.root), model_name=NAME)
    assert re.fullmatch(
        rf"{re.escape(str(repository.folder))}: no version can be served: "
        r"version 2: .*manifest\.json: no 'tasks': .*; version 1: .*model\.pt2: content hash .*",
        str(e.value),
    )


def other_manifest(folder: Path, out: Path) -> Path:
    """The folder with a manifest that lacks its tasks."""
    shutil.copytree(folder, out)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["tasks"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_a_deleted_repository_leaves_the_served_version_serving(tmp_path, programs, expected, caplog):
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    publish(repository, programs[1])
    app = create_app(None, repository=str(repository.root), model_name=NAME)
    shutil.rmtree(repository.root)
    with caplog.at_level(logging.WARNING, logger="heavyranker.serve.versions"):
        app.state.versions.refresh()
    assert "no complete version (the repository was deleted?): keeping version 2" in caplog.text
    with serving(app) as url, httpx.Client() as client:
        version, scores = rank(client, url)
    assert version == "2"
    np.testing.assert_allclose(scores, expected[1], rtol=1e-5, atol=1e-6)


def test_a_pinned_version_serves_whatever_is_newer(tmp_path, programs):
    repository = ModelRepository(tmp_path / "repo", NAME)
    for folder in programs[:2]:
        publish(repository, folder)
    app = create_app(None, repository=str(repository.root), model_name=NAME, pin_version=1)
    publish(repository, programs[2])
    app.state.versions.refresh()
    assert app.state.versions.current.version == 1
    assert repository.served_versions() == [1]  # retention keeps it
    with pytest.raises(UserError, match="no complete version 9"):
        create_app(None, repository=str(repository.root), model_name=NAME, pin_version=9)


def test_an_empty_repository_is_refused(tmp_path):
    with pytest.raises(UserError, match="no complete version to serve"):
        create_app(None, repository=str(tmp_path), model_name=NAME)


@pytest.fixture()
def triton_client(tmp_path, programs) -> Iterator[tuple[triton.InferenceServerClient, ModelRepository]]:
    repository = ModelRepository(tmp_path / "repo", NAME)
    publish(repository, programs[0])
    publish(repository, programs[1])
    app = create_app(None, repository=str(repository.root), model_name=NAME)
    with serving(app) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        yield client, repository
        client.close()


def test_tritonclient_reads_and_infers_the_loaded_version(triton_client, expected):
    client, _ = triton_client
    assert client.is_model_ready(NAME) and client.is_model_ready(NAME, "2")
    assert not client.is_model_ready(NAME, "1")  # published, not loaded
    metadata = client.get_model_metadata(NAME, "2")
    assert metadata["versions"] == ["2"] and client.get_model_metadata(NAME)["versions"] == ["2"]
    inputs = []
    for name, values in FEATURES.items():
        tensor = triton.InferInput(name, list(values.shape), "FP32")
        inputs.append(tensor.set_data_from_numpy(values, binary_data=True))
    for version in ("2", ""):
        result = client.infer(NAME, inputs, model_version=version)
        assert result.get_response()["model_version"] == "2"
        np.testing.assert_allclose(result.as_numpy("score"), expected[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="no version '1' loaded"):
        client.infer(NAME, inputs, model_version="1")


@pytest.mark.parametrize("flags", [[], ["--model", "m", "--repository", "r"]], ids=["neither", "both"])
def test_serve_takes_a_model_folder_or_a_repository(capsys, flags):
    assert main(["serve", *flags]) == 2
    assert capsys.readouterr().err == (
        "error: serve: give --model (an exported folder) or --repository (a model repository)\n"
    )
