"""The HTTP service through a real uvicorn server on a free loopback port: ranking, the model's description
(and no host path in it), every kind of bad input (a 4xx naming the candidate and the field), random
malformed bodies (never a 5xx), concurrent requests, the OpenAPI schema, and the `serve` command."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from heavyranker.cli import main
from heavyranker.errors import UserError
from heavyranker.serve.app import create_app
from heavyranker.serve.scorer import Scorer
from tests.conftest import CONFIGS
from tests.serve.conftest import ENV_VALUE, STEP, Exported, random_features, serving

MAX_CANDIDATES = 50
MAX_BODY = 150_000  # 51 candidates of full-precision floats fit: the count check answers
WIDTHS = {
    "continuous": 48,
    "binary": 16,
    "user_embedding": 16,
    "user_eng_embedding": 16,
    "author_embedding": 16,
}


@pytest.fixture(scope="module")
def client(exported: Exported) -> Iterator[httpx.Client]:
    app = create_app(exported.folder, max_candidates=MAX_CANDIDATES, max_body_bytes=MAX_BODY)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def body(n: int = 5, seed: int = 0) -> dict:
    """A valid request: candidates c0..c<n-1>; continuous values include NaN and Infinity, which this model
    zeroes (JSON as Python writes it)."""
    features = random_features({name: (width,) for name, width in WIDTHS.items()}, n, seed)
    candidates = [
        {"id": f"c{i}", "features": {name: values[i].tolist() for name, values in features.items()}}
        for i in range(n)
    ]
    return {"candidates": candidates}


def post(client: httpx.Client, request: dict | bytes) -> httpx.Response:
    content = request if isinstance(request, bytes) else json.dumps(request).encode()
    return client.post("/v1/rank", content=content, headers={"content-type": "application/json"})


def expected_scores(exported: Exported, request: dict) -> dict[str, tuple[float, list[float]]]:
    """id -> (score, probabilities) from the bare exported program, on the request's values."""
    scorer = Scorer(exported.folder)
    candidates = request["candidates"]
    features = {
        name: torch.tensor([c["features"][name] for c in candidates], dtype=torch.float32) for name in WIDTHS
    }
    probabilities, score = scorer(features)
    rows = zip(candidates, score.tolist(), probabilities.tolist(), strict=True)
    return {c["id"]: (s, p) for c, s, p in rows}


def test_healthz_and_model(client: httpx.Client, exported: Exported):
    assert client.get("/healthz").json() == {"status": "ok"}
    program = (exported.folder / "model.pt2").read_bytes()
    assert client.get("/v1/model").json() == {
        "format": "heavyranker-scorer/2",
        "program_format": "pt2",
        "program_sha256": hashlib.sha256(program).hexdigest(),
        "precision": "fp32",
        "table_precision": "fp32",
        "checkpoint": {"step": STEP},
        "tasks": exported.config.task_names,
        "inputs": [
            {"name": name, "shape": [width], "dtype": "float32", "allow_non_finite": name == "continuous"}
            for name, width in WIDTHS.items()
        ],
        "outputs": {
            "probabilities": {"shape": ["batch", len(exported.config.task_names)], "dtype": "float32"},
            "score": {"shape": ["batch"], "dtype": "float32"},
        },
        "engagement_weights": exported.config.engagement_weights,
    }


def test_the_model_description_holds_no_host_path_or_environment_value(client: httpx.Client, exported):
    manifest = (exported.folder / "manifest.json").read_text()
    host_values = [str(exported.folder.parent), str(CONFIGS.resolve()), ENV_VALUE]  # tmp dir, repo, env
    assert all(value in manifest for value in host_values)  # the manifest holds them: the server must not
    served = client.get("/v1/model").text
    assert [value for value in host_values if value in served] == []


def test_candidates_come_back_sorted_by_score_with_their_probabilities(client: httpx.Client, exported):
    request = body(30, seed=1)
    response = post(client, request)
    assert response.status_code == 200, response.text
    ranked = response.json()["candidates"]
    expected = expected_scores(exported, request)
    assert sorted(c["id"] for c in ranked) == sorted(expected)
    scores = [c["score"] for c in ranked]
    assert scores == sorted(scores, reverse=True)
    assert [c["id"] for c in ranked] == sorted(expected, key=lambda i: -expected[i][0])
    weights = exported.config.engagement_weights
    for candidate in ranked:
        score, probabilities = expected[candidate["id"]]
        assert list(candidate["probabilities"]) == exported.config.task_names
        np.testing.assert_allclose(list(candidate["probabilities"].values()), probabilities, rtol=1e-6)
        by_hand = sum(weights[t] * p for t, p in candidate["probabilities"].items())
        assert candidate["score"] == pytest.approx(by_hand, rel=1e-5, abs=1e-4)
        assert candidate["score"] == pytest.approx(score, rel=1e-6)


def test_integer_ids_and_an_empty_request(client: httpx.Client):
    request = body(3)
    ids = [-(2**63), 1000, 2**64 - 1]  # the ends of the accepted range: the response encodes them exactly
    for candidate, cid in zip(request["candidates"], ids, strict=True):
        candidate["id"] = cid
    assert sorted(c["id"] for c in post(client, request).json()["candidates"]) == ids
    assert post(client, {"candidates": []}).json() == {"candidates": []}


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A mutation that sets candidates[2]'s field at `path` (dotted, [i] for a list element)."""

    def mutate(request: dict) -> None:
        target = request["candidates"][2]
        keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(request: dict) -> None:
        target = request["candidates"][2]
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


# (mutation of candidates[2] (id 'c2'), what the message must say after "candidates[2] (id 'c2'): ")
BAD_CANDIDATES = {
    "short vector": (
        _set("features.continuous", [0.5] * 47),
        "features.continuous: 47 values, the model takes 48",
    ),
    "long vector": (_set("features.binary", [1] * 17), "features.binary: 17 values, the model takes 16"),
    "not a list": (
        _set("features.continuous", 0.5),
        "features.continuous: must be a list of 48 numbers, not a number",
    ),
    "string": (_set("features.binary[5]", "1"), "features.binary[5]: a string is not a number"),
    "null": (_set("features.user_embedding[3]", None), "features.user_embedding[3]: null is not a number"),
    "boolean": (_set("features.binary[0]", True), "features.binary[0]: a boolean is not a number"),
    "nested list": (
        _set("features.author_embedding[1]", [1.0]),
        "features.author_embedding[1]: a list is not a number",
    ),
    "object": (_set("features.continuous[7]", {"v": 1}), "features.continuous[7]: an object is not a number"),
    "NaN": (
        _set("features.user_embedding[4]", float("nan")),
        "features.user_embedding[4]: nan: this input must be finite",
    ),
    "Infinity": (
        _set("features.binary[2]", float("-inf")),
        "features.binary[2]: -inf: this input must be finite",
    ),
    "a flag of 2": (_set("features.binary[3]", 2), "features.binary[3]: 2: a binary feature is 0 or 1"),
    "a flag of 2**62": (  # exact in JSON, and as float32 still far from 0 or 1
        _set("features.binary[3]", 2**62),
        f"features.binary[3]: {2**62}: a binary feature is 0 or 1",
    ),
    "a flag of 0.5": (_set("features.binary[0]", 0.5), "features.binary[0]: 0.5: a binary feature is 0 or 1"),
    "beyond float32": (
        _set("features.user_eng_embedding[0]", 1e39),
        "features.user_eng_embedding[0]: 1e+39: this input must be finite (as float32)",
    ),
    "extreme values": (  # finite, but the embedding's LayerNorm overflows: the output is NaN
        _set("features.user_embedding", [1e30, -1e30] + [0.0] * 14),
        "features: the model's output is not finite for these values",
    ),
    "missing input": (_delete("features.user_eng_embedding"), "features.user_eng_embedding: missing"),
    "unknown input": (_set("features.discrete", [1, 2]), "features.discrete: not an input of this model"),
    "missing features": (_delete("features"), "features: missing"),
    "features not an object": (_set("features", [1, 2]), "features: must be an object, not a list"),
    "unknown field": (_set("score", 3), "score: unknown field"),
}


@pytest.mark.parametrize("case", BAD_CANDIDATES, ids=list(BAD_CANDIDATES))
def test_a_bad_candidate_is_a_422_naming_candidate_and_field(client: httpx.Client, case: str):
    mutate, message = BAD_CANDIDATES[case]
    request = body()
    mutate(request)
    response = post(client, request)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"candidates[2] (id 'c2'): {message}"), response.json()


@pytest.mark.parametrize("field, value", [("continuous", [[1.0, 2.0]] * 48), ("binary", [[1]] * 16)])
def test_a_vector_of_lists_is_a_422_also_when_every_candidate_sends_one(client: httpx.Client, field, value):
    # Alike in every candidate, the lists once made one regular array: reshaped (one number each) or a 500.
    request = body(3)
    for candidate in request["candidates"]:
        candidate["features"][field] = value
    response = post(client, request)
    assert response.status_code == 422, response.text
    expected = f"candidates[0] (id 'c0'): features.{field}[0]: a list is not a number"
    assert response.json()["detail"] == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "candidates[2]: id: missing"),
        ([1], "candidates[2]: id: must be a string or an integer, not a list"),
        (True, "candidates[2]: id: must be a string or an integer, not a boolean"),
    ],
)
def test_a_bad_id_is_a_422_naming_the_candidate(client: httpx.Client, value, message):
    request = body()
    if value is None:
        del request["candidates"][2]["id"]
    else:
        request["candidates"][2]["id"] = value
    response = post(client, request)
    assert (response.status_code, response.json()["detail"]) == (422, message)


@pytest.mark.parametrize(
    "content, status, message",
    [
        (
            b'{"candidates": [',
            400,
            "the body is not valid JSON: EOF while parsing a list at line 1 column 16",
        ),
        (b"", 400, "the body is not valid JSON"),
        (b"[1, 2]", 422, 'the body must be a JSON object {"candidates": [...]}, not a list'),
        (b"{}", 422, "candidates: missing"),
        (b'{"candidates": {}}', 422, "candidates: must be a list of candidates, not an object"),
        (b'{"candidates": [], "user": 1}', 422, "user: unknown field"),
        (
            b'{"candidates": [7]}',
            422,
            "candidates[0]: must be an object with id and features, not an integer",
        ),
    ],
)
def test_a_bad_body_is_a_4xx_naming_the_field(client: httpx.Client, content: bytes, status: int, message):
    response = post(client, content)
    assert response.status_code == status
    assert response.json()["detail"].startswith(message), response.json()


def test_nan_and_infinity_where_the_model_zeroes_them(client: httpx.Client, exported: Exported):
    request = body(4)
    request["candidates"][1]["features"]["continuous"] = [float("nan"), float("inf"), float("-inf")] * 16
    response = post(client, request)
    assert response.status_code == 200
    assert all(np.isfinite(c["score"]) for c in response.json()["candidates"])


def test_too_many_candidates_is_a_413(client: httpx.Client):
    request = body(1)
    request["candidates"] *= MAX_CANDIDATES + 1
    response = post(client, request)
    assert response.status_code == 413
    expected = f"candidates: {MAX_CANDIDATES + 1} of them, at most {MAX_CANDIDATES} per request"
    assert response.json()["detail"] == expected


def test_a_body_too_large_is_a_413_with_or_without_its_length(client: httpx.Client):
    padded = json.dumps(body(1)).encode() + b" " * MAX_BODY
    response = post(client, padded)
    assert response.status_code == 413
    assert response.json()["detail"] == f"the body is {len(padded)} bytes, at most {MAX_BODY} are accepted"

    def chunks() -> Iterator[bytes]:  # no content-length: the server counts while reading
        for start in range(0, len(padded), 8192):
            yield padded[start : start + 8192]

    response = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == f"the body is over {MAX_BODY} bytes, the most accepted"


def test_random_malformed_bodies_never_get_a_5xx(client: httpx.Client):
    rng = random.Random(0)
    junk = [None, True, False, "x", "", [], {}, [1.5], {"a": 1}, -1, 2**70, 1e308, 1e400, float("nan"), 0.5]
    valid = body(4)
    statuses = []
    for _ in range(300):
        request = copy.deepcopy(valid)
        kind = rng.random()
        if kind < 0.5:  # replace one node: a random walk down the document
            parent, key = None, None
            node = request
            while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.8):
                key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
                parent, node = node, node[key]
            if parent is None:
                request = rng.choice(junk)
            elif rng.random() < 0.3 and isinstance(parent, dict):
                del parent[key]
            else:
                parent[key] = rng.choice(junk)
            content = json.dumps(request).encode()
        else:  # damage the bytes: cut, flip, insert
            content = bytearray(json.dumps(request).encode())
            at = rng.randrange(len(content))
            if kind < 0.7:
                content = content[:at]
            elif kind < 0.85:
                content[at] = rng.randrange(256)
            else:
                content[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            content = bytes(content)
        response = post(client, content)
        assert response.status_code in (200, 400, 413, 422), (response.text, content[:300])
        if response.status_code != 200:
            assert isinstance(response.json()["detail"], str) and response.json()["detail"]
        statuses.append(response.status_code)
    assert {400, 422} <= set(statuses)  # the mutations reached both the parser and the checks


def test_concurrent_requests_get_their_own_answers(client: httpx.Client, exported: Exported):
    requests = [body(n, seed=n) for n in (3, 9, 17, 25, 33, 41)]
    expected = [[c["id"] for c in post(client, r).json()["candidates"]] for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        for _ in range(2):
            answers = list(pool.map(lambda r: post(client, r), requests))
            assert [[c["id"] for c in a.json()["candidates"]] for a in answers] == expected


def test_the_openapi_schema_describes_the_api(client: httpx.Client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/rank", "/v1/model", "/healthz"} <= set(schema["paths"])
    rank = schema["paths"]["/v1/rank"]["post"]
    assert rank["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RankRequest"
    }
    assert rank["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RankResponse"
    }
    for status in ("400", "408", "413", "415", "422", "503"):
        assert rank["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorMessage"
        }
    components = schema["components"]["schemas"]
    request = components["RankRequest"]
    assert request["properties"]["candidates"]["maxItems"] == MAX_CANDIDATES
    assert request["properties"]["candidates"]["items"] == {"$ref": "#/components/schemas/Candidate"}
    candidate = components["Candidate"]
    assert set(candidate["required"]) == {"id", "features"} and candidate["additionalProperties"] is False
    features = components["Features"]
    assert set(features["required"]) == set(WIDTHS) and features["additionalProperties"] is False
    for name, width in WIDTHS.items():
        field = features["properties"][name]
        assert (field["type"], field["items"], field["minItems"], field["maxItems"]) == (
            "array",
            {"type": "number"},
            width,
            width,
        )
    assert "NaN" in features["properties"]["continuous"]["description"]
    assert set(components["RankedCandidate"]["properties"]) == {"id", "score", "probabilities"}
    assert client.get("/docs").status_code == 200


def test_the_serve_command_listens_on_loopback(exported: Exported, tmp_path):
    """On --port 0, the port the system gave, which uvicorn's start line names (a port found free first
    could be taken by another process before the server binds it)."""
    log = open(tmp_path / "serve.log", "w")  # the server writes to it until terminated
    server = subprocess.Popen(
        [sys.executable, "-m", "heavyranker", "serve", "--model", str(exported.folder), "--port", "0"]
        + ["--max-queue", "3", "--read-timeout", "2.5", "--max-batch", "64", "--batch-wait-ms", "1"]
        + ["--model-name", "ranker"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while not (started := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", _text(tmp_path))):
            assert server.poll() is None and time.monotonic() < deadline, _text(tmp_path)
            time.sleep(0.2)
        url = f"http://127.0.0.1:{started.group(1)}"
        assert int(started.group(1)) > 0
        while httpx.get(f"{url}/healthz").status_code != 200:  # ready once the model is loaded
            assert server.poll() is None and time.monotonic() < deadline, _text(tmp_path)
            time.sleep(0.2)
        with httpx.Client(base_url=url) as http:
            assert post(http, body(2)).status_code == 200
            assert http.get("/v2/models/ranker/ready").status_code == 200
        # Which model answers, for the operator (the exported checkpoint's step, its precision).
        assert f"serving {exported.folder} (checkpoint step {STEP}, fp32); the API is described at /docs" in (
            _text(tmp_path)
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_second_server_on_a_port_in_use_is_one_line(exported: Exported, capsys):
    """Was uvicorn's logged OSError and exit 3, after the model had loaded; a real listener holds the port."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert main(["serve", "--model", str(exported.folder), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"error: serve: 127.0.0.1:{port} is in use (another server listens there); choose another --port, "
        "or 0 for any free one\n"
    )


def test_a_host_not_of_this_machine_is_one_line(exported: Exported, capsys):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): no machine has it, so binding it fails with EADDRNOTAVAIL.
    assert main(["serve", "--model", str(exported.folder), "--host", "192.0.2.1", "--port", "0"]) == 2
    assert re.fullmatch(
        r"error: serve: cannot listen on 192\.0\.2\.1:0 \(--host, --port\): .*address.*\n",
        capsys.readouterr().err,
    )


def _text(tmp_path) -> str:
    return (tmp_path / "serve.log").read_text()


def test_max_candidates_must_be_positive(exported: Exported):
    with pytest.raises(
        UserError, match=r"^serving.max_candidates should be greater than or equal to 1 \(got 0\)$"
    ):
        create_app(exported.folder, max_candidates=0)
