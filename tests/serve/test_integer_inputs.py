"""A model that reads integer inputs too (small embeddings and position debiasing over the discrete tensor,
a large embedding over one id per example): export, equality with the eager model, and requests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import Config, load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.app import rank_response
from heavyranker.serve.export import export_model
from heavyranker.serve.request import BadRequest, parse_candidates
from heavyranker.serve.scorer import Scorer
from heavyranker.serve.tensors import parse_binary_candidates
from heavyranker.serve.v2 import model_metadata
from tests.conftest import CONFIGS
from tests.serve.conftest import binary_request, random_features, tensors

EMBEDDINGS = [
    "model.small_embeddings={tables: [{name: a, num_embeddings: 10, embedding_dim: 4, index: 3}]}",
    "model.position_debias_config={max_position: 8, num_dims: 4, position_feature_index: 0}",
    "model.large_embeddings={tables: [{name: author, num_embeddings: 50, embedding_dim: 4, "
    "feature_name: meta__author_id}]}",
]


@pytest.fixture(scope="module")
def ids_model(tmp_path_factory) -> tuple[Config, torch.nn.Module, Path]:
    """The config, the eager model and its checkpoint."""
    config = load_config(CONFIGS / "local_small.yaml", EMBEDDINGS)
    torch.manual_seed(0)
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    folder = tmp_path_factory.mktemp("ids")
    checkpoint = save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0})
    return config, model.eval(), checkpoint


@pytest.fixture(scope="module")
def exported_ids(ids_model, tmp_path_factory) -> tuple[torch.nn.Module, Scorer]:
    config, model, checkpoint = ids_model
    out = str(tmp_path_factory.mktemp("ids_pt2"))
    folder = export_model(config, checkpoint=str(checkpoint), out=out, format="pt2")
    return model, Scorer(folder)


def test_integer_inputs_are_in_the_manifest_and_scored_as_the_eager_model(exported_ids):
    model, scorer = exported_ids
    inputs = {i["name"]: (i["shape"], i["dtype"]) for i in scorer.manifest["inputs"]}
    assert inputs["discrete"] == ([8], "int64") and inputs["meta__author_id"] == ([], "int64")
    shapes = {name: tuple(shape) for name, (shape, _) in inputs.items()}
    features = {k: torch.from_numpy(v) for k, v in random_features(shapes, 9, seed=2).items()}
    features["discrete"] %= 12  # some ids inside the tables, some beyond them (their own row)
    features["meta__author_id"] %= 60
    with torch.no_grad():
        expected = model(features)["calibrated_probabilities"]
    torch.testing.assert_close(scorer(features)[0], expected, rtol=1e-5, atol=1e-5)


def test_onnxruntime_scores_integer_inputs_as_the_eager_model(ids_model, tmp_path):
    """At two batch sizes, with ids below zero, inside the tables and beyond them."""
    config, model, checkpoint = ids_model
    folder = export_model(config, checkpoint=str(checkpoint), out=str(tmp_path), format="onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    shapes = {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    for n in (4, 33):
        features = random_features(shapes, n, seed=n)
        features["discrete"] = features["discrete"] % 24 - 6  # small tables of 10 rows, positions up to 8
        features["meta__author_id"] = features["meta__author_id"] % 120 - 30  # a table of 50 rows
        (probabilities,) = session.run(["probabilities"], features)
        with torch.no_grad():
            eager = model({k: torch.from_numpy(v) for k, v in features.items()})["calibrated_probabilities"]
        np.testing.assert_allclose(probabilities, eager.numpy(), rtol=0, atol=1e-5)


def _body(scorer: Scorer, n: int = 3) -> dict:
    shapes = {spec.name: spec.shape for spec in scorer.inputs}
    features = random_features(shapes, n, seed=4)
    return {
        "candidates": [
            {"id": i, "features": {k: v[i].tolist() for k, v in features.items()}} for i in range(n)
        ]
    }


def test_integer_and_scalar_inputs_parse_to_int64(exported_ids):
    _, scorer = exported_ids
    body = _body(scorer)
    ids, arrays = parse_candidates(json.dumps(body).encode(), scorer.inputs, 10)
    assert ids == [0, 1, 2]
    assert arrays["discrete"].dtype == np.int64 and arrays["discrete"].shape == (3, 8)
    np.testing.assert_array_equal(
        arrays["meta__author_id"], [c["features"]["meta__author_id"] for c in body["candidates"]]
    )
    probabilities, score = scorer({name: torch.from_numpy(array) for name, array in arrays.items()})
    ranked = json.loads(rank_response(ids, probabilities.numpy(), score.numpy(), scorer.tasks))["candidates"]
    assert sorted(c["id"] for c in ranked) == [0, 1, 2]


WHERE = "candidates[1] (id 1): features."


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("discrete", [1.5] + [0] * 7, "discrete[0]: 1.5 is not an integer"),
        ("discrete", [0] * 7 + [2**70], "discrete[7]: 1180591620717411303424 is outside the range of int64"),
        ("meta__author_id", [5], "meta__author_id: must be one number, not a list"),
        ("meta__author_id", "5", "meta__author_id: a string is not a number"),
        ("meta__author_id", float("nan"), "meta__author_id: nan is not an integer"),
    ],
)
def test_bad_integer_values_name_candidate_and_field(exported_ids, field, value, message):
    _, scorer = exported_ids
    body = _body(scorer)
    body["candidates"][1]["features"][field] = value
    with pytest.raises(BadRequest) as error:
        parse_candidates(json.dumps(body).encode(), scorer.inputs, 10)
    assert (error.value.status, str(error.value)) == (422, WHERE + message)


def test_integer_inputs_are_int64_tensors_on_v2_and_in_binary_requests(exported_ids):
    _, scorer = exported_ids
    described = {i["name"]: i for i in model_metadata(scorer, "m")["inputs"]}
    assert described["discrete"] == {"name": "discrete", "datatype": "INT64", "shape": [-1, 8]}
    assert described["meta__author_id"] == {"name": "meta__author_id", "datatype": "INT64", "shape": [-1]}
    body = json.dumps(_body(scorer)).encode()
    ids, expected = parse_candidates(body, scorer.inputs, 10)
    header, data = tensors(expected, binary=True)
    content, headers = binary_request({"ids": ids, "inputs": header}, data)
    length = headers["inference-header-content-length"]
    parsed_ids, arrays = parse_binary_candidates(content, length, scorer.inputs, 10)
    assert parsed_ids == ids
    for name, array in expected.items():
        assert arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(arrays[name], array)
    as_float = {**expected, "meta__author_id": expected["meta__author_id"].astype(np.float32)}
    header, data = tensors(as_float, binary=True)
    content, headers = binary_request({"ids": ids, "inputs": header}, data)
    with pytest.raises(BadRequest) as error:
        parse_binary_candidates(content, headers["inference-header-content-length"], scorer.inputs, 10)
    assert str(error.value) == "input 'meta__author_id': datatype 'FP32', the model takes INT64"
