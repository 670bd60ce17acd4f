"""GET /metrics after a known mix of requests, parsed by prometheus_client's own parser: requests by route and
status code, latencies by route, candidates per forward and the queue's gauges count what was sent."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

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

INFER = "/v2/models/{name}/infer"


def scrape(client: httpx.Client) -> dict[str, list]:
    """Metric family name -> its samples."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def test_the_metrics_count_what_was_sent(exported: Exported):
    app = create_app(exported.folder)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        json_type = {"content-type": "application/json"}
        for n in (2, 3, 4):
            response = client.post(
                "/v1/rank",
                content=json_request(list(range(n)), random_features(SHAPES, n)),
                headers=json_type,
            )
            assert response.status_code == 200
        for content in (b'{"candidates": [{"id": 1}]}', b"[]"):
            assert client.post("/v1/rank", content=content, headers=json_type).status_code == 422
        assert (
            client.post("/v1/rank", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
        )
        described, data = tensors(random_features(SHAPES, 5), binary=True)
        content, headers = binary_request({"inputs": described}, data)
        assert (
            client.post("/v2/models/heavyranker/infer", content=content, headers=headers).status_code == 200
        )
        assert client.post("/v2/models/other/infer", content=content, headers=headers).status_code == 404
        assert client.get("/healthz").status_code == 200
        assert client.get("/nowhere").status_code == 404
        metrics = scrape(client)

    requests = {(s.labels["route"], s.labels["code"]): s.value for s in metrics["heavyranker_http_requests"]}
    assert requests == {
        ("/v1/rank", "200"): 3,
        ("/v1/rank", "422"): 2,
        ("/v1/rank", "415"): 1,
        (INFER, "200"): 1,
        (INFER, "404"): 1,
        ("/healthz", "200"): 1,
        ("unmatched", "404"): 1,
    }
    latencies = {
        s.labels["route"]: s.value
        for s in metrics["heavyranker_http_request_duration_seconds"]
        if s.name.endswith("_count")
    }
    assert latencies == {"/v1/rank": 6, INFER: 2, "/healthz": 1, "unmatched": 1}
    batches = {s.name: s.value for s in metrics["heavyranker_batch_candidates"] if "le" not in s.labels}
    # One request at a time: a forward each, of its own candidates (the 4xx never reached the model).
    assert (batches["heavyranker_batch_candidates_count"], batches["heavyranker_batch_candidates_sum"]) == (
        4,
        2 + 3 + 4 + 5,
    )
    assert [s.value for s in metrics["heavyranker_requests_in_progress"]] == [0]
    assert [s.value for s in metrics["heavyranker_requests_waiting_for_model"]] == [0]


def test_each_app_counts_its_own_requests(exported: Exported):
    first, second = create_app(exported.folder), create_app(exported.folder)
    with serving(first) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/healthz").status_code == 200
    with serving(second) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert scrape(client)["heavyranker_http_requests"] == []  # the first app's request is not here
