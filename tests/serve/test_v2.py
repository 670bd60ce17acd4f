"""The Open Inference Protocol through the official client (tritonclient.http) against a real uvicorn server:
health, metadata, JSON and binary tensors both ways, results equal to the bare scorer's on the same inputs,
and errors as the protocol has them (a 4xx with {"error": ...})."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from heavyranker.serve.app import create_app
from heavyranker.serve.scorer import Scorer
from tests.serve.conftest import SHAPES, Exported, binary_request, random_features, serving, tensors

NAME = "ranker"
MAX_CANDIDATES = 50


@pytest.fixture(scope="module")
def url(exported: Exported) -> Iterator[str]:
    app = create_app(exported.folder, model_name=NAME, max_candidates=MAX_CANDIDATES)
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def scorer(exported: Exported) -> Scorer:
    return Scorer(exported.folder)


def inputs(features: dict[str, np.ndarray], binary: bool) -> list[triton.InferInput]:
    made = []
    for name, values in features.items():
        tensor = triton.InferInput(name, list(values.shape), "FP32")
        made.append(tensor.set_data_from_numpy(values, binary_data=binary))
    return made


def expected(scorer: Scorer, features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    probabilities, score = scorer({name: torch.from_numpy(values) for name, values in features.items()})
    return probabilities.numpy(), score.numpy()


def test_health_and_server_metadata(client: triton.InferenceServerClient):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert not client.is_model_ready("another")
    metadata = client.get_server_metadata()
    assert metadata["name"] == "heavyranker" and "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_names_every_input_and_output(client: triton.InferenceServerClient, exported):
    metadata = client.get_model_metadata(NAME)
    assert metadata["name"] == NAME and metadata["platform"] == "pytorch_torchexport"
    assert metadata["inputs"] == [
        {"name": name, "datatype": "FP32", "shape": [-1, *shape]} for name, shape in SHAPES.items()
    ]
    tasks = exported.config.task_names
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(tasks)]},
        {"name": "score", "datatype": "FP32", "shape": [-1]},
    ]
    assert metadata["parameters"]["tasks"].split(",") == tasks


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_gives_the_scorers_outputs(client: triton.InferenceServerClient, scorer: Scorer, binary: bool):
    features = random_features(SHAPES, 7, seed=3)  # NaN and inf in continuous, which this model zeroes
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("score", "probabilities")]
    result = client.infer(NAME, inputs(features, binary), outputs=outputs, request_id="r-1")
    probabilities, score = expected(scorer, features)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("score"), score, rtol=1e-6)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == NAME
    assert [o["name"] for o in response["outputs"]] == ["score", "probabilities"]  # in the order asked
    assert all(("data" in o) != binary for o in response["outputs"])


def test_without_requested_outputs_all_come_back_binary(client: triton.InferenceServerClient, scorer: Scorer):
    # The client then sets the request parameter binary_data_output.
    features = random_features(SHAPES, 2, seed=4)
    result = client.infer(NAME, inputs(features, binary=True))
    probabilities, score = expected(scorer, features)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("score"), score, rtol=1e-6)
    assert all("data" not in o for o in result.get_response()["outputs"])


def test_an_output_requested_twice_is_a_400(client: triton.InferenceServerClient):
    # Each copy was answered: a 1.4 MB request for 500 candidates and 20,000 copies of `score` made a 200 MB
    # response (a 7.8 MB request could ask for gigabytes).
    score = triton.InferRequestedOutput("score", binary_data=False)
    with pytest.raises(InferenceServerException) as raised:
        client.infer(NAME, inputs(random_features(SHAPES, 2), binary=True), outputs=[score, score])
    assert (raised.value.status(), raised.value.message()) == (
        "400",
        "outputs[1]: output 'score' requested twice",
    )


def failure(
    client: triton.InferenceServerClient, tensors: list, model: str = NAME
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, tensors)
    return raised.value


def test_an_unknown_model_is_a_404(client: triton.InferenceServerClient):
    error = failure(client, inputs(random_features(SHAPES, 2), binary=True), model="another")
    assert error.status() == "404"
    assert error.message() == f"unknown model 'another': this server serves '{NAME}'"


def test_a_wrong_shape_datatype_or_missing_input_is_a_400(client: triton.InferenceServerClient):
    features = random_features(SHAPES, 3)
    narrow = triton.InferInput("binary", [3, 15], "FP32").set_data_from_numpy(features["binary"][:, :15])
    double = triton.InferInput("binary", [3, 16], "FP64").set_data_from_numpy(
        features["binary"].astype(float)
    )
    cases = {
        "input 'binary': shape [3, 15], the model takes [-1, 16]": narrow,
        "input 'binary': datatype 'FP64', the model takes FP32": double,
    }
    others = [tensor for tensor in inputs(features, binary=True) if tensor.name() != "binary"]
    for message, replaced in cases.items():
        error = failure(client, [*others, replaced])
        assert (error.status(), error.message()) == ("400", message)
    error = failure(client, others)
    assert error.status() == "400" and error.message().startswith("input 'binary': missing")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_nan_where_the_input_must_be_finite_is_a_400(client: triton.InferenceServerClient, binary: bool):
    features = random_features(SHAPES, 3)
    features["user_embedding"][1, 4] = np.nan
    error = failure(client, inputs(features, binary))
    assert error.status() == "400"
    assert error.message() == "input 'user_embedding': element [1, 4] is nan: this input must be finite"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_binary_feature_other_than_0_or_1_is_a_400(client: triton.InferenceServerClient, binary: bool):
    features = random_features(SHAPES, 3)
    features["binary"][2, 7] = 2.0
    error = failure(client, inputs(features, binary))
    assert error.status() == "400"
    assert error.message() == "input 'binary': element [2, 7] is 2.0: a binary feature is 0 or 1"


def raw_infer(
    url: str, header: dict, data: bytes = b"", content_type: str = "application/json"
) -> httpx.Response:
    """A request by hand: binary when there is data, else JSON sent as `content_type`."""
    if data:
        content, headers = binary_request(header, data)
    else:
        content, headers = json.dumps(header).encode(), {"content-type": content_type}
    return httpx.post(f"{url}/v2/models/{NAME}/infer", content=content, headers=headers, timeout=60)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h["inputs"][0].update(data=[True] * 48), "input 'continuous': data: a bool where"),
        (lambda h: h["inputs"][1].update(data=["1"] * 16), "input 'binary': data: a str where"),
        (
            lambda h: h["inputs"][1].update(data=[1.0] * 15),
            "input 'binary': 15 values in data, shape [1, 16]",
        ),
        (lambda h: h["inputs"][1].update(data=[[1.0], 2.0]), "input 'binary': data: lists nested unevenly"),
        (lambda h: h["inputs"][1].update(shape=[2, 16]), "input 'binary': 16 values in data, shape [2, 16]"),
        (lambda h: h["inputs"].append(h["inputs"][0]), "input 'continuous': given twice"),
        (lambda h: h["inputs"][0].update(name="dense"), "inputs[0]: unknown input 'dense'"),
        (lambda h: h["inputs"][0].update(name=["continuous"]), "inputs[0]: unknown input ['continuous']"),
        (lambda h: h["inputs"][0].update(name={"a": 1}), "inputs[0]: unknown input {'a': 1}"),
        (lambda h: h.update(outputs=[{"name": "logits"}]), "outputs[0]: unknown output 'logits'"),
        (lambda h: h.update(inputs={}), "inputs: must be a list of tensors"),
        (lambda h: h.update(model="x"), "'model': unknown field"),
    ],
)
def test_a_malformed_json_request_is_a_400_with_the_protocols_error_body(url: str, change, message: str):
    described, _ = tensors(random_features(SHAPES, 1), binary=False)
    header = {"inputs": described}
    change(header)
    response = raw_infer(url, header)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message), response.json()


def test_binary_data_that_does_not_add_up_is_a_400(url: str):
    described, data = tensors(random_features(SHAPES, 2), binary=True)
    response = raw_infer(url, {"inputs": described}, data + b"\0")
    assert response.status_code == 400
    assert response.json() == {
        "error": f"{len(data) + 1} bytes after the JSON header, and the inputs' binary_data_size add up to "
        f"{len(data)}"
    }
    described[1]["parameters"]["binary_data_size"] -= 4
    response = raw_infer(url, {"inputs": described}, data)
    assert response.status_code == 400
    assert response.json()["error"] == "input 'binary': 124 bytes of binary data, shape [2, 16] takes 128"


def test_too_many_candidates_is_a_413(url: str):
    described, data = tensors(random_features(SHAPES, MAX_CANDIDATES + 1), binary=True)
    response = raw_infer(url, {"inputs": described}, data)
    assert response.status_code == 413
    assert response.json() == {
        "error": f"input 'continuous': {MAX_CANDIDATES + 1} candidates, at most {MAX_CANDIDATES} per request"
    }


def test_the_limits_answer_in_the_protocols_error_body(url: str):
    described, _ = tensors(random_features(SHAPES, 1), binary=False)
    response = raw_infer(url, {"inputs": described}, content_type="text/plain")
    assert response.status_code == 415
    assert response.json() == {
        "error": "the body must be sent as content-type application/json or application/octet-stream, "
        "not text/plain"
    }
    response = httpx.get(f"{url}/v2/models/{NAME}/versions", timeout=60)
    assert (response.status_code, response.json()) == (404, {"error": "Not Found"})


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_key_given_twice_in_the_request_is_a_400_naming_where(url: str, binary: bool):
    # As in a JSON /v1/rank body: the parser would keep the last value, which the writer may not mean.
    described, data = tensors(random_features(SHAPES, 1), binary=binary)
    text = json.dumps({"id": "a", "inputs": described}).replace('"id": "a"', '"id": "a", "id": "b"')
    if binary:
        content = text.encode() + data
        headers = {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(text)),
        }
    else:
        content, headers = text.encode(), {"content-type": "application/json"}
    response = httpx.post(f"{url}/v2/models/{NAME}/infer", content=content, headers=headers, timeout=60)
    assert response.status_code == 400
    assert response.json() == {"error": "id: given twice (a key may appear once in an object)"}
