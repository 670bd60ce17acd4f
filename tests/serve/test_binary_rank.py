"""/v1/rank with binary candidates (content-type application/octet-stream): a JSON header {"ids", "inputs"}
of Inference-Header-Content-Length bytes, then the tensors' raw bytes, as in the v2 binary extension. The
same candidates sent as JSON are the reference: same ranking, same scores."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from heavyranker.serve.app import create_app
from tests.serve.conftest import (
    SHAPES,
    Exported,
    binary_request,
    json_request,
    random_features,
    serving,
    tensors,
)

MAX_CANDIDATES = 50


@pytest.fixture(scope="module")
def client(exported: Exported) -> Iterator[httpx.Client]:
    app = create_app(exported.folder, max_candidates=MAX_CANDIDATES)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http


def rank_request(ids: list, features: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    described, data = tensors(features, binary=True)
    return binary_request({"ids": ids, "inputs": described}, data)


def test_binary_candidates_rank_as_their_json(client: httpx.Client):
    features = random_features(SHAPES, 40, seed=5)  # with NaN and inf where the model zeroes them
    ids = [f"t{i}" if i % 2 else i for i in range(40)]
    content, headers = rank_request(ids, features)
    binary = client.post("/v1/rank", content=content, headers=headers)
    text = client.post(
        "/v1/rank", content=json_request(ids, features), headers={"content-type": "application/json"}
    )
    assert binary.status_code == text.status_code == 200, binary.text
    ranked, reference = binary.json()["candidates"], text.json()["candidates"]
    assert [c["id"] for c in ranked] == [c["id"] for c in reference]
    # The same float32 values either way (JSON carries them exactly) in forwards of the same size: equal bit
    # for bit in practice, but a BLAS may round differently for another memory alignment of the rows.
    np.testing.assert_allclose([c["score"] for c in ranked], [c["score"] for c in reference], rtol=1e-6)
    for mine, theirs in zip(ranked, reference, strict=True):
        assert list(mine["probabilities"]) == list(theirs["probabilities"])
        np.testing.assert_allclose(
            list(mine["probabilities"].values()), list(theirs["probabilities"].values()), rtol=1e-6
        )


@pytest.mark.parametrize(
    "change, status, message",
    [
        (lambda ids, f: (ids[:-1], f), 400, "2 ids for 3 candidates"),
        (lambda ids, f: ([1, [2], 3], f), 400, "ids[1]: must be a string or an integer, not a list"),
        (lambda ids, f: (ids, {**f, "binary": f["binary"][:, :8]}), 400, "input 'binary': shape [3, 8]"),
        (lambda ids, f: (ids, {k: v for k, v in f.items() if k != "binary"}), 400, "input 'binary': missing"),
        (
            lambda ids, f: (ids, {**f, "author_embedding": np.full((3, 16), np.inf, np.float32)}),
            400,
            "input 'author_embedding': element [0, 0] is inf: this input must be finite",
        ),
        (
            lambda ids, f: (
                ids,
                {**f, "binary": np.where(np.arange(16) == 5, 2.0**62, f["binary"]).astype("f4")},
            ),
            400,
            f"input 'binary': element [0, 5] is {2.0**62}: a binary feature is 0 or 1",
        ),
        (lambda ids, f: (ids * 17, f), 413, f"ids: 51 candidates, at most {MAX_CANDIDATES} per request"),
    ],
)
def test_a_bad_binary_request_is_a_4xx_naming_the_tensor(client: httpx.Client, change, status, message):
    ids, features = change([1, 2, 3], random_features(SHAPES, 3))
    content, headers = rank_request(ids, features)
    response = client.post("/v1/rank", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["detail"].startswith(message), response.json()


def test_a_header_length_beyond_the_body_is_a_400(client: httpx.Client):
    content, headers = rank_request([1], random_features(SHAPES, 1))
    headers["inference-header-content-length"] = str(len(content) + 1)
    response = client.post("/v1/rank", content=content, headers=headers)
    assert response.status_code == 400
    assert response.json() == {
        "detail": f"Inference-Header-Content-Length: '{len(content) + 1}' is not a length within the "
        f"body's {len(content)} bytes"
    }


TWICE = "given twice (a key may appear once in an object)"


@pytest.mark.parametrize(
    "written, where",
    [
        (lambda text: text.replace('"ids": [1]', '"ids": [2], "ids": [1]'), "ids"),
        (
            lambda text: text.replace('"name": "binary"', '"name": "continuous", "name": "binary"'),
            "inputs[1].name",
        ),
        (  # written with an escape, the key is the same
            lambda text: text.replace(
                '{"binary_data_size"', '{"binary_data_siz\\u0065": 0, "binary_data_size"'
            ),
            "inputs[0].parameters.binary_data_size",
        ),
    ],
    ids=["ids", "a tensor's name", "escaped"],
)
def test_a_key_given_twice_in_the_json_header_is_a_400_naming_where(
    client: httpx.Client, written, where: str
):
    # As in a JSON body (a 422 there): the parser would keep the last value, which the writer may not mean.
    described, data = tensors(random_features(SHAPES, 1), binary=True)
    content, headers = binary_request({"ids": [1], "inputs": described}, data)
    text = written(content[: int(headers["inference-header-content-length"])].decode())
    headers["inference-header-content-length"] = str(len(text))
    response = client.post("/v1/rank", content=text.encode() + data, headers=headers)
    assert (response.status_code, response.json()) == (400, {"detail": f"{where}: {TWICE}"})
