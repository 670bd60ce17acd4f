"""GET /metrics: the service's counters in Prometheus' text format, from a registry of the app's own (the
global one would mix the figures of several apps in a process, and of the tests that build them).

    heavyranker_http_requests_total{route, code}             requests answered; errors are the 4xx and 5xx
    heavyranker_http_request_duration_seconds{route}         from the request's arrival to its response's end
    heavyranker_batch_candidates                             candidates per forward of the model
    heavyranker_requests_in_progress                         requests admitted: the queue's depth (limits.py)
    heavyranker_requests_waiting_for_model                   of those, parsed and queued for a forward
    heavyranker_model_data_staleness_seconds                 since the newest data the served model was
                                                             trained on (manifest.json's newest_data_time;
                                                             NaN for a model exported without it)

Serving from a model repository (versions.py), also:

    heavyranker_model_version                                the version served
    heavyranker_model_swaps_total                            versions swapped in since the start
    heavyranker_model_failed_loads_total                     versions that failed to load, and were skipped
    heavyranker_model_version_age_seconds                    since the served version was published

`route` is the route's template (/v2/models/{name}/infer), so that clients' paths cannot grow the number
of series; a path no route matches counts as "unmatched".
"""

from __future__ import annotations

import math
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .batcher import Batcher
from .limits import RequestLimits
from .versions import ServedVersions

# From a health check (under a millisecond) to the forward of a batch of several thousand candidates.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The app's metrics; `watch` gives the gauges what they read at each scrape."""

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "heavyranker_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "heavyranker_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_candidates = Histogram(
            "heavyranker_batch_candidates",
            "Candidates per forward of the model",
            buckets=_powers_of_two(max_batch),
            registry=self.registry,
        )
        self.in_progress = Gauge(
            "heavyranker_requests_in_progress",
            "Requests admitted: reading their body, being parsed, waiting for the model or in its forward",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "heavyranker_requests_waiting_for_model",
            "Requests parsed and queued for a forward of the model",
            registry=self.registry,
        )

    def watch(self, limits: RequestLimits, batcher: Batcher) -> None:
        self.in_progress.set_function(lambda: limits.admitted)
        self.waiting.set_function(lambda: batcher.waiting)

    def watch_staleness(self, versions: ServedVersions) -> None:
        """Seconds since the newest training data of the version `versions` serves."""
        staleness = Gauge(
            "heavyranker_model_data_staleness_seconds",
            "Seconds since the newest data the served model was trained on (NaN: not recorded)",
            registry=self.registry,
        )
        staleness.set_function(lambda: data_staleness(versions.current.scorer.manifest))

    def watch_versions(self, versions: ServedVersions) -> None:
        """The repository's gauges and counters, fed by `versions`."""
        version = Gauge("heavyranker_model_version", "The model version served", registry=self.registry)
        version.set_function(lambda: versions.current.version or 0)
        swaps = Counter(
            "heavyranker_model_swaps", "Versions swapped in since the start", registry=self.registry
        )
        failed = Counter(
            "heavyranker_model_failed_loads",
            "Versions that failed to load (damaged, another model's inputs) and were skipped",
            registry=self.registry,
        )
        failed.inc(len(versions.failed_versions))  # at the start, below the newest that loads
        versions.on_swap, versions.on_failed_load = swaps.inc, failed.inc
        age = Gauge(
            "heavyranker_model_version_age_seconds",
            "Seconds since the served version was published in the repository",
            registry=self.registry,
        )
        age.set_function(lambda: time.time() - (versions.current.published or time.time()))

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def data_staleness(manifest: dict) -> float:
    """Seconds since the manifest's newest_data_time; NaN where the export does not say (an older export,
    or a checkpoint of a run that recorded no data time)."""
    newest = manifest.get("newest_data_time")
    return math.nan if newest is None else time.time() - newest


class Instrumented:
    """ASGI middleware that counts and times every HTTP request into `metrics`."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # if the app raises before it starts a response, the server answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router, in this same scope, when a route matched
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def _powers_of_two(most: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the first power of two at or beyond `most`."""
    buckets = [1]
    while buckets[-1] < most:
        buckets.append(buckets[-1] * 2)
    return tuple(map(float, buckets))
