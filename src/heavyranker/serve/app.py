"""`heavyranker serve`: an HTTP ranking service for an exported model folder (FastAPI under uvicorn).

    POST /v1/rank   {"candidates": [{"id": ..., "features": {input name: [numbers], ...}}, ...]}, or the same
                    as binary tensors (content-type application/octet-stream; tensors.py)
                    -> {"candidates": [{"id", "score", "probabilities": {task: p}}, ...]}, best score first
    GET  /v1/model  what a client needs of the manifest: tasks, inputs, weights, the program's hash and
                    precision and table precision, step
    GET  /healthz   {"status": "ok"}
    /v2/...         the Open Inference Protocol (v2.py), for Triton's and KServe's clients
    GET  /metrics   Prometheus' text format (metrics.py)

Every bad request is a 4xx: on /v1, its `detail` names the candidate (index and id) and the field; on /v2,
the protocol's `error` names the tensor. limits.py decides whether a request is read at all (content type,
size, place in the queue, read timeout); batcher.py merges concurrent requests into one forward. A JSON body
is parsed by hand (request.py) rather than by a pydantic body model, which would validate millions of
numbers one by one; the pydantic models below only describe the API in the OpenAPI schema.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException

from ..config.serving import ServeOptions, serve_options
from ..errors import UserError
from . import v2
from .batcher import Batcher, first_non_finite
from .limits import MAX_HEAD_BYTES, RequestLimits, h11_with_deadline, media_type
from .metrics import Instrumented, Metrics
from .repository import open_repository
from .request import BadRequest, CandidateId, parse_candidates
from .scorer import MANIFEST, InputSpec
from .tensors import HEADER_LENGTH, parse_binary_candidates
from .versions import ServedVersions

# Body limit per number: the longest JSON float (-1.2345678901234567e-308) and a separator, with room.
BYTES_PER_VALUE = 32
BYTES_PER_CANDIDATE = 256  # the id, the keys and the brackets
RANK_CONTENT_TYPES = ("application/json", "application/octet-stream")

log = logging.getLogger(__name__)


class RankedCandidate(BaseModel):
    id: str | int
    score: float = Field(description="sum over tasks of engagement_weight * probability")
    probabilities: dict[str, float] = Field(description="task name -> calibrated probability")


class RankResponse(BaseModel):
    candidates: list[RankedCandidate] = Field(description="the request's candidates, highest score first")


class ErrorMessage(BaseModel):
    detail: str = Field(description="what is wrong and where: candidates[index] (id ...): field: problem")


def create_app(
    model_dir: str | Path | None, *, max_body_bytes: int | None = None, **overrides: object
) -> FastAPI:
    """The app for one model folder. `overrides`: options of config.serving.ServeOptions by name, over the
    `serving:` section of the config the folder was exported with (its manifest's); see limits.py for
    max_queue and read_timeout, batcher.py for max_batch and batch_wait_ms. The body limit defaults to what
    max_candidates candidates need as JSON. `app.state` holds the options, the limits, the batcher, the
    metrics and the versions (`versions.current.scorer`: the one served)."""
    versions = served_versions(model_dir, overrides)
    scorer = versions.current.scorer  # the first version's: later versions take the same requests
    section = scorer.manifest.get("config", {}).get("serving", {})
    options = serve_options(section, overrides, str(versions.current.folder / MANIFEST))
    max_candidates = options.max_candidates
    if max_body_bytes is None:
        values = sum(spec.width for spec in scorer.inputs)
        max_body_bytes = max_candidates * (values * BYTES_PER_VALUE + BYTES_PER_CANDIDATE)
    limits = RequestLimits(
        max_body_bytes=max_body_bytes, max_queue=options.max_queue, read_timeout_s=options.read_timeout
    )
    metrics = Metrics(options.max_batch)
    batcher = Batcher(
        None,  # each request gives its version's: holding the first would keep it for the server's life
        max_batch=options.max_batch,
        wait_ms=options.batch_wait_ms,
        on_batch=metrics.batch_candidates.observe,
    )
    metrics.watch(limits, batcher)
    metrics.watch_staleness(versions)
    if versions.repository is not None:
        metrics.watch_versions(versions)
        versions.warm_batch = options.max_batch
    scorer.warm_up()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with batcher:
            versions.start(options.poll_seconds)
            try:
                yield
            finally:
                versions.stop()

    app = FastAPI(
        title="heavyranker",
        version="1",
        summary="Ranks candidates by their weighted engagement probabilities.",
        lifespan=lifespan,
    )
    app.state.options, app.state.limits = options, limits
    app.state.batcher, app.state.metrics, app.state.versions = batcher, metrics, versions
    app.add_middleware(Instrumented, metrics=metrics)
    request_model = _request_model(scorer.inputs, max_candidates)
    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorMessage, "description": "the body is not JSON, or its binary layout is invalid"},
        408: {"model": ErrorMessage, "description": "the body was too slow to arrive; the connection closes"},
        413: {"model": ErrorMessage, "description": "too many candidates, or the body is too large"},
        415: {
            "model": ErrorMessage,
            "description": "the content type is not application/json or application/octet-stream",
        },
        422: {"model": ErrorMessage, "description": "a candidate or one of its fields is invalid"},
        503: {"model": ErrorMessage, "description": "the queue is full: retry after Retry-After seconds"},
    }

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return _error(request, str(error), error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(request, error.detail, error.status_code, error.headers)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", summary="The model's tasks, inputs, engagement weights, program hash and step.")
    def model() -> dict[str, Any]:
        served = versions.current
        return client_manifest(served.scorer.manifest, served.version)

    @app.post(
        "/v1/rank",
        response_model=RankResponse,
        responses=errors,
        summary="Rank one request's candidates.",
        description="Candidates as JSON, or as binary tensors: content-type application/octet-stream, a JSON "
        f'header of {HEADER_LENGTH} bytes, {{"ids": [...], "inputs": [tensors as in /v2 infer]}}, '
        "then the tensors' bytes.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def rank(request: Request) -> Response:
        served = versions.current  # the version that scores this request, whatever is swapped in meanwhile
        async with limits.admit(request, RANK_CONTENT_TYPES) as body:
            # Worker threads: parsing and the response would otherwise stop the event loop for their duration.
            if media_type(request) == "application/json":
                parse = partial(parse_candidates, body)
            else:
                parse = partial(parse_binary_candidates, body, request.headers.get(HEADER_LENGTH))
            ids, arrays = await run_in_threadpool(parse, served.scorer.inputs, max_candidates)
            probabilities, score = await batcher.score(arrays, served.scorer)
        content = await run_in_threadpool(
            rank_response, ids, probabilities, score, served.scorer.tasks, served.version
        )
        return Response(content, media_type="application/json")

    @app.get("/metrics", summary="The service's metrics, in Prometheus' text format.")
    def prometheus() -> Response:
        return metrics.exposition()

    app.include_router(
        v2.router(versions, batcher, limits, model_name=options.model_name, max_candidates=max_candidates)
    )
    app.openapi = _openapi(app, request_model)  # type: ignore[method-assign]
    return app


def rank_response(
    ids: list[CandidateId],
    probabilities: np.ndarray,
    score: np.ndarray,
    tasks: Sequence[str],
    version: int | None = None,
) -> bytes:
    """The response body: candidates sorted by score, best first (ties keep their order), and the version
    of the repository's model that scored them (serving from a repository)."""
    bad = first_non_finite(probabilities, score)
    if bad is not None:
        raise BadRequest(
            422,
            f"candidates[{bad}] (id {ids[bad]!r}): features: the model's output is not finite "
            "for these values (an extreme value somewhere?)",
        )
    order = np.argsort(-score, kind="stable")
    rows = zip(order.tolist(), score[order].tolist(), probabilities[order].tolist(), strict=True)
    ranked = [
        {"id": ids[k], "score": s, "probabilities": dict(zip(tasks, p, strict=True))} for k, s, p in rows
    ]
    body: dict[str, Any] = {"candidates": ranked}
    if version is not None:
        body["model_version"] = str(version)
    return orjson.dumps(body)


def _error(
    request: Request, message: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """An error in the body its API defines: the Open Inference Protocol's {"error"}, FastAPI's {"detail"}."""
    key = "error" if request.url.path == "/v2" or request.url.path.startswith("/v2/") else "detail"
    return JSONResponse({key: message}, status_code=status, headers=headers)


def client_manifest(manifest: dict[str, Any], version: int | None = None) -> dict[str, Any]:
    """What a client needs of the manifest, named field by field: not the checkpoint's path, the schema's
    file or the resolved config, whose paths and environment-substituted values are the host's own. With
    the repository's version that is served."""
    input_fields = ("name", "shape", "dtype", "allow_non_finite")
    described = {
        "format": manifest["format"],
        "program_format": manifest["program_format"],
        "program_sha256": manifest["program_sha256"],
        "precision": manifest.get("precision", "fp32"),
        "table_precision": manifest.get("table_precision", "fp32"),
        "checkpoint": {"step": manifest["checkpoint"]["step"]},
        "tasks": manifest["tasks"],
        "inputs": [{field: spec[field] for field in input_fields} for spec in manifest["inputs"]],
        "outputs": manifest["outputs"],
        "engagement_weights": manifest["engagement_weights"],
    }
    return described if version is None else {**described, "model_version": str(version)}


def served_versions(model_dir: str | Path | None, overrides: dict[str, object]) -> ServedVersions:
    """The model folder, or with the `repository` option its newest (or pinned) version, loaded."""
    repository = overrides.get("repository")
    if repository is None:
        if model_dir is None:
            raise UserError("serve: give a model folder or a repository")
        return ServedVersions.from_folder(model_dir)
    name = overrides.get("model_name", ServeOptions.model_fields["model_name"].default)
    pin = overrides.get("pin_version")
    return ServedVersions.from_repository(open_repository(str(repository), str(name)), pin_version=pin)


def run_server(model_dir: str | None, **overrides: object) -> None:
    """Serves create_app(model_dir, **overrides) on its options' host and port until interrupted."""
    app = create_app(model_dir, **overrides)
    host, port = app.state.options.host, app.state.options.port
    check_can_listen(host, port)
    log.info("%s; the API is described at /docs", what_is_served(app.state.versions))
    uvicorn.Server(server_config(app, host=host, port=port)).run()


def what_is_served(versions: ServedVersions) -> str:
    """Which model the server answers with, for its operator: the folder or the repository's version, and
    the checkpoint it was exported from (uvicorn's own line says where it listens)."""
    current = versions.current
    repository = versions.repository
    what = (
        str(current.folder)
        if repository is None
        else f"version {current.version}, {repository.location(current.version)}"
    )
    step = current.scorer.manifest.get("checkpoint", {}).get("step")
    return f"serving {what} (checkpoint step {step}, {current.scorer.precision})"


def check_can_listen(host: str, port: int) -> None:
    """A one-line UserError where serve cannot listen on host:port (a second server on the port, an address
    not of this machine, a port that needs privileges), where uvicorn logs the OSError and exits 3. A probe
    bound and closed, as uvicorn binds (SO_REUSEADDR): a process that takes the port between the two still
    meets uvicorn's own line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"serve: {where} is in use (another server listens there); choose another --port, "
                "or 0 for any free one"
            ) from None
        raise UserError(f"serve: cannot listen on {where} (--host, --port): {e.strerror or e}") from None


def server_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's config for an app of create_app: connections idle past its read timeout close."""
    http = h11_with_deadline(app.state.limits.read_timeout_s)
    return uvicorn.Config(app, http=http, h11_max_incomplete_event_size=MAX_HEAD_BYTES, **options)


def _request_model(inputs: list[InputSpec], max_candidates: int) -> type[BaseModel]:
    """The request as a pydantic model of this model's inputs: for the OpenAPI schema only."""
    strict = ConfigDict(extra="forbid")
    fields: dict[str, Any] = {}
    for spec in inputs:
        number = float if spec.dtype.is_floating_point else int
        described = f"{spec.dtype}".removeprefix("torch.") + (
            "; NaN and +-Infinity allowed" if spec.allow_non_finite else "; finite"
        )
        if spec.shape:
            annotation: Any = Annotated[list[number], Field(min_length=spec.width, max_length=spec.width)]
            described = f"{spec.width} values, {described}"
        else:
            annotation = number
        fields[spec.name] = (annotation, Field(description=described))
    features = create_model("Features", __config__=strict, **fields)
    candidate = create_model("Candidate", __config__=strict, id=(str | int, ...), features=(features, ...))
    return create_model(
        "RankRequest", __config__=strict, candidates=(list[candidate], Field(max_length=max_candidates))
    )


def _openapi(app: FastAPI, request_model: type[BaseModel]):
    """FastAPI's schema, with the request model (which no route parameter declares) in its components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components[request_model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
