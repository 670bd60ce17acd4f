"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API), so that a client of a Triton or KServe
fleet (`tritonclient.http`, KServe's clients) calls this server as it calls those.

    GET  /v2                        server metadata: name, version, extensions
    GET  /v2/health/live, /ready    200 while the server runs (the model loads before it listens)
    GET  /v2/models/{name}          the model's inputs and outputs: names, datatypes, shapes (-1: candidates)
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer    one tensor per model input, [candidates, *shape]
                                    -> probabilities [candidates, tasks] FP32, score [candidates] FP32
    GET  /v2/models/{name}/versions/{version}[/ready], POST .../infer: the same, of that version if loaded

Serving from a model repository (versions.py), the model's metadata lists the version served, every infer
response names the version that scored it (`model_version`), and a version that is not loaded is a 404.

Input tensors come as JSON or with the binary tensor data extension (tensors.py). Outputs are binary when
the request's output asks `"binary_data": true` or, for outputs it does not list, when the request's
parameter binary_data_output is true. Errors are the protocol's {"error": "..."} (app.py writes it): 404
for another model's name, 400 for a request the model cannot take, 413 for too many candidates. The columns
of `probabilities` are the tasks in the order of the model metadata's parameter `tasks`, comma-separated;
its parameters `precision` and `table_precision` are the export's (fp32, bf16 or int8; fp32 or int8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from .batcher import Batcher, first_non_finite
from .limits import RequestLimits
from .request import BadRequest
from .scorer import InputSpec, Scorer
from .tensors import DATATYPES, HEADER_LENGTH, invalid, json_object, read_tensors, split_body
from .versions import Loaded, ServedVersions

# tritonclient.http sends no content type, aiohttp-based clients application/octet-stream. A page on another
# origin can post without one too, but reads no answer (no CORS): it could only spend the model's time,
# as any client can.
CONTENT_TYPES = ("application/json", "application/octet-stream", None)
OUTPUTS = ("probabilities", "score")
EXTENSIONS = ["binary_tensor_data"]
PLATFORMS = {".pt2": "pytorch_torchexport", ".onnx": "onnxruntime_onnx"}  # by the program file's suffix


@dataclass
class InferRequest:
    id: str | None
    arrays: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]  # (name, binary), in the order they are answered


def router(
    versions: ServedVersions,
    batcher: Batcher,
    limits: RequestLimits,
    *,
    model_name: str,
    max_candidates: int,
) -> APIRouter:
    """The protocol's routes for the model served as `model_name`."""
    routes = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])

    def known(name: str, version: str | None = None) -> Loaded:
        """The served version, if `name` (and `version`, if given) names it."""
        if name != model_name:
            raise BadRequest(404, f"unknown model {name!r}: this server serves {model_name!r}")
        served = versions.current
        if version is not None and version != str(served.version if served.version is not None else 1):
            raise BadRequest(404, f"model {name!r} has no version {version!r} loaded")
        return served

    @routes.get("", summary="Server metadata.")
    def server() -> dict[str, Any]:
        return {"name": "heavyranker", "version": metadata.version("heavyranker"), "extensions": EXTENSIONS}

    @routes.get("/health/live", summary="200 while the server runs.")
    def live() -> dict[str, bool]:
        return {"live": True}

    @routes.get("/health/ready", summary="200 once the model is loaded, which is before the server listens.")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @routes.get("/models/{name}", summary="The model's inputs and outputs.")
    @routes.get("/models/{name}/versions/{version}", summary="The inputs and outputs of a loaded version.")
    def model(name: str, version: str | None = None) -> dict[str, Any]:
        served = known(name, version)
        return model_metadata(served.scorer, model_name, served.version)

    @routes.get("/models/{name}/ready", summary="200 if the server serves this model.")
    @routes.get("/models/{name}/versions/{version}/ready", summary="200 if this version is loaded.")
    def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        known(name, version)
        return {"name": name, "ready": True}

    @routes.post("/models/{name}/infer", summary="Score candidates: JSON or binary tensors.")
    @routes.post("/models/{name}/versions/{version}/infer", summary="Score candidates with this version.")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        served = known(name, version)  # this request's version, whatever is swapped in meanwhile
        scorer = served.scorer
        async with limits.admit(request, CONTENT_TYPES) as body:
            length = request.headers.get(HEADER_LENGTH)
            parsed = await run_in_threadpool(parse_infer, body, length, scorer.inputs, max_candidates)
            probabilities, score = await batcher.score(parsed.arrays, scorer)
        content, headers = await run_in_threadpool(
            infer_response, model_name, parsed, probabilities, score, served.version
        )
        return Response(content, headers=headers)

    return routes


def model_metadata(scorer: Scorer, model_name: str, version: int | None = None) -> dict[str, Any]:
    inputs = [
        {"name": spec.name, "datatype": DATATYPES[spec.dtype][0], "shape": [-1, *spec.shape]}
        for spec in scorer.inputs
    ]
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(scorer.tasks)]},
        {"name": "score", "datatype": "FP32", "shape": [-1]},
    ]
    platform = PLATFORMS.get(Path(scorer.manifest["program"]).suffix, "unknown")
    # A parameter is a string, number or boolean: the tasks, in the order of the probabilities' columns.
    parameters = {
        "tasks": ",".join(scorer.tasks),
        "precision": scorer.precision,
        "table_precision": scorer.table_precision,
    }
    described = {
        "name": model_name,
        "platform": platform,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": parameters,
    }
    return described if version is None else {**described, "versions": [str(version)]}


def parse_infer(
    body: bytes | bytearray, header_length: str | None, inputs: Sequence[InputSpec], max_candidates: int
) -> InferRequest:
    header, binary = split_body(body, header_length)
    unknown = sorted(set(header) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise invalid(f"{unknown[0]!r}: unknown field (a request has id, parameters, inputs and outputs)")
    parameters = json_object(header.get("parameters", {}), "parameters")
    default_binary = parameters.get("binary_data_output", False)
    if type(default_binary) is not bool:
        raise invalid("parameters.binary_data_output: must be true or false")
    request_id = header.get("id")
    if request_id is not None and type(request_id) is not str:
        raise invalid("id: must be a string")
    arrays = read_tensors(header.get("inputs"), binary, inputs, max_candidates)
    return InferRequest(request_id, arrays, _outputs(header.get("outputs"), default_binary))


def _outputs(outputs: object, default_binary: bool) -> list[tuple[str, bool]]:
    if outputs is None:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(outputs, list):
        raise invalid("outputs: must be a list")
    requested = []
    for i, output in enumerate(outputs):
        output = json_object(output, f"outputs[{i}]")
        name = output.get("name")
        if name not in OUTPUTS:
            raise invalid(
                f"outputs[{i}]: unknown output {name!r} (the model's outputs: {', '.join(OUTPUTS)})"
            )
        if any(name == known for known, _ in requested):  # each copy would be answered: a small request
            raise invalid(f"outputs[{i}]: output {name!r} requested twice")  # could ask gigabytes back
        parameters = json_object(output.get("parameters", {}), f"output {name!r}: parameters")
        unsupported = sorted(set(parameters) - {"binary_data"})
        if unsupported:
            raise invalid(f"output {name!r}: parameter {unsupported[0]!r} is not supported")
        binary = parameters.get("binary_data", default_binary)
        if type(binary) is not bool:
            raise invalid(f"output {name!r}: binary_data must be true or false")
        requested.append((name, binary))
    return requested


def infer_response(
    model_name: str,
    request: InferRequest,
    probabilities: np.ndarray,
    score: np.ndarray,
    version: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or a JSON header and the binary outputs after it."""
    row = first_non_finite(probabilities, score)
    if row is not None:
        raise invalid(
            f"candidate {row}: the model's output is not finite for these values (an extreme value?)"
        )
    values = {"probabilities": probabilities, "score": score}
    described, binary = [], []
    for name, as_binary in request.outputs:
        array = values[name]
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if as_binary:
            binary.append(array.astype("<f4").tobytes())
            tensor["parameters"] = {"binary_data_size": len(binary[-1])}
        else:
            tensor["data"] = array.ravel().tolist()
        described.append(tensor)
    response: dict[str, Any] = {"model_name": model_name, "outputs": described}
    if version is not None:
        response["model_version"] = str(version)
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response)
    if not binary:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *binary]), headers
