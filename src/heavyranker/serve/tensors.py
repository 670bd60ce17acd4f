"""Tensors in the binary layout of the Open Inference Protocol's binary tensor data extension, which both
/v2/models/{name}/infer and a binary /v1/rank read: a JSON header of Inference-Header-Content-Length bytes
(the whole body when the header is absent), then the raw bytes of each input tensor whose parameters give
binary_data_size, little-endian, in the header's order. A tensor may instead carry its values in the header,
as "data": a flat or nested list, row-major.

    {"name": "continuous", "datatype": "FP32", "shape": [1000, 2117],
     "parameters": {"binary_data_size": 8468000}}

Decoding binary tensors is a view of the body (np.frombuffer): 1,000 candidates of local_prod's model are 11
MB of float32, against 55 MB of JSON text that takes 0.3 s to parse. Every BadRequest names the tensor. The
flags (the input data.columns.FLAGS names) are 0 or 1, as in a JSON /v1/rank body.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pydantic_core
import torch

from ..data.columns import FLAGS
from .limits import header_number
from .request import GIVEN_TWICE, BadRequest, CandidateId, dotted, duplicate_key, id_problem
from .scorer import InputSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
# torch dtype -> (datatype, little-endian numpy dtype). numpy has no bfloat16: such an input is sent as FP32,
# which the program casts.
DATATYPES: dict[torch.dtype, tuple[str, np.dtype]] = {
    torch.float32: ("FP32", np.dtype("<f4")),
    torch.float64: ("FP64", np.dtype("<f8")),
    torch.float16: ("FP16", np.dtype("<f2")),
    torch.bfloat16: ("FP32", np.dtype("<f4")),
    torch.int64: ("INT64", np.dtype("<i8")),
    torch.int32: ("INT32", np.dtype("<i4")),
    torch.int16: ("INT16", np.dtype("<i2")),
    torch.int8: ("INT8", np.dtype("i1")),
    torch.uint8: ("UINT8", np.dtype("u1")),
    torch.bool: ("BOOL", np.dtype("?")),
}


def parse_binary_candidates(
    body: bytes | bytearray, header_length: str | None, inputs: Sequence[InputSpec], max_candidates: int
) -> tuple[list[CandidateId], dict[str, np.ndarray]]:
    """A binary /v1/rank body -> (ids, arrays), as request.parse_candidates gives for a JSON one. Its header
    is {"ids": [one per candidate], "inputs": [one tensor per model input]}; errors are 400s, as in v2."""
    header, binary = split_body(body, header_length)
    unknown = sorted(set(header) - {"ids", "inputs"})
    if unknown:
        raise invalid(f"{unknown[0]!r}: unknown field (the JSON header has ids and inputs)")
    ids = header.get("ids")
    if not isinstance(ids, list):
        raise invalid("ids: must be a list, one id per candidate")
    if len(ids) > max_candidates:
        raise BadRequest(413, f"ids: {len(ids)} candidates, at most {max_candidates} per request")
    for i, cid in enumerate(ids):
        problem = id_problem(cid)
        if problem:
            raise invalid(f"ids[{i}]: {problem}")
    arrays = read_tensors(header.get("inputs"), binary, inputs, max_candidates)
    rows = len(next(iter(arrays.values())))
    if rows != len(ids):
        raise invalid(f"{len(ids)} ids for {rows} candidates")
    return ids, arrays


def split_body(body: bytes | bytearray, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header (the whole body when no length is given) and the binary data after it. A key given
    twice in the header is refused, as it is in a JSON /v1/rank body."""
    size = len(body)
    if header_length is not None:
        length = header_number(header_length)
        if length is None or length > len(body):
            raise invalid(
                f"{HEADER_LENGTH}: {header_length[:32]!r} is not a length within the body's {size} bytes"
            )
        size = length
    text = body if size == len(body) else body[:size]
    try:
        header = pydantic_core.from_json(text)
    except ValueError as e:
        raise invalid(f"the JSON header is not valid JSON: {e}") from None
    twice = duplicate_key(text, header, "the JSON header")
    if twice is not None:  # as in a JSON /v1/rank body, whose candidates this header describes too
        raise invalid(f"{dotted(twice)}: {GIVEN_TWICE}")
    return json_object(header, "the JSON header"), memoryview(body)[size:]


def read_tensors(
    tensors: object, binary: memoryview, inputs: Sequence[InputSpec], max_candidates: int
) -> dict[str, np.ndarray]:
    """One array [candidates, *shape] per model input, of its datatype's numpy dtype, from the header's
    input tensors and the binary data after the header. BadRequest names the tensor and what is wrong."""
    if not isinstance(tensors, list):
        raise invalid("inputs: must be a list of tensors")
    specs = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for i, tensor in enumerate(tensors):
        tensor = json_object(tensor, f"inputs[{i}]")
        name = tensor.get("name")
        if type(name) is not str or name not in specs:  # a list or an object cannot be looked up
            raise invalid(f"inputs[{i}]: unknown input {name!r} (the model's inputs: {', '.join(specs)})")
        if name in arrays:
            raise invalid(f"input {name!r}: given twice")
        array, used = _read(tensor, specs[name], binary[offset:], max_candidates)
        arrays[name] = array
        offset += used
    missing = [name for name in specs if name not in arrays]
    if missing:
        raise invalid(f"input {missing[0]!r}: missing (the model's inputs: {', '.join(specs)})")
    if offset != len(binary):
        raise invalid(
            f"{len(binary)} bytes after the JSON header, and the inputs' binary_data_size add up to {offset}"
        )
    rows = {len(array) for array in arrays.values()}
    if len(rows) > 1:
        raise invalid(f"the inputs have different numbers of candidates: {sorted(rows)}")
    return arrays


def _read(tensor: dict, spec: InputSpec, binary: memoryview, max_candidates: int) -> tuple[np.ndarray, int]:
    """One tensor's array, and how many bytes it took of `binary` (the body's data not yet read)."""
    name, dtype = spec.name, DATATYPES[spec.dtype][1]
    shape = _shape(tensor, spec, max_candidates)
    size = json_object(tensor.get("parameters", {}), f"input {name!r}: parameters").get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise invalid(f"input {name!r}: binary_data_size {size!r} is beyond the body's binary data")
        array = _from_bytes(name, binary[:size], dtype, shape)
    elif "data" in tensor:
        array, size = _from_json(name, tensor["data"], dtype, shape), 0
    else:
        raise invalid(f"input {name!r}: no data, and no binary_data_size")
    if spec.dtype.is_floating_point and not spec.allow_non_finite:
        _refuse_first(name, array, ~np.isfinite(array), "this input must be finite")
    if name == FLAGS:
        _refuse_first(name, array, (array != 0) & (array != 1), "a binary feature is 0 or 1")
    return array, size


def _shape(tensor: dict, spec: InputSpec, max_candidates: int) -> tuple[int, ...]:
    name, datatype = spec.name, DATATYPES[spec.dtype][0]
    if tensor.get("datatype") != datatype:
        raise invalid(f"input {name!r}: datatype {tensor.get('datatype')!r}, the model takes {datatype}")
    shape = tensor.get("shape")
    expected = [-1, *spec.shape]
    valid = (
        isinstance(shape, list)
        and len(shape) == len(expected)
        and all(type(n) is int and n >= 0 for n in shape)
        and shape[1:] == expected[1:]
    )
    if not valid:
        raise invalid(f"input {name!r}: shape {shape!r}, the model takes {expected}")
    if shape[0] > max_candidates:
        raise BadRequest(413, f"input {name!r}: {shape[0]} candidates, at most {max_candidates} per request")
    return tuple(shape)


def _from_bytes(name: str, data: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise invalid(
            f"input {name!r}: {len(data)} bytes of binary data, shape {list(shape)} takes {expected}"
        )
    if dtype == np.bool_ and (np.frombuffer(data, np.uint8) > 1).any():
        raise invalid(f"input {name!r}: a BOOL byte other than 0 or 1")
    return np.frombuffer(data, dtype).reshape(shape)


def _from_json(name: str, data: object, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A flat or nested list of numbers (booleans for BOOL) -> an array of `shape`."""
    flat = data
    try:
        while isinstance(flat, list) and flat and type(flat[0]) is list:
            flat = list(itertools.chain.from_iterable(flat))
    except TypeError:  # a number beside a list
        raise invalid(f"input {name!r}: data: lists nested unevenly") from None
    if not isinstance(flat, list):
        raise invalid(f"input {name!r}: data: must be a list")
    # Checked by type rather than left to numpy, which reads true as 1 and "1" as 1 without a word.
    allowed = {bool} if dtype.kind == "b" else {int} if dtype.kind in "iu" else {int, float}
    wrong = set(map(type, flat)) - allowed
    if wrong:
        takes = " or ".join(sorted(t.__name__ for t in allowed))
        raise invalid(
            f"input {name!r}: data: a {next(iter(wrong)).__name__} where the datatype takes {takes}"
        )
    if len(flat) != math.prod(shape):
        raise invalid(
            f"input {name!r}: {len(flat)} values in data, shape {list(shape)} has {math.prod(shape)}"
        )
    try:
        with np.errstate(over="ignore"):  # beyond float32's range is inf: allowed or rejected after
            return np.array(flat, dtype).reshape(shape)
    except OverflowError:
        raise invalid(f"input {name!r}: data: a value beyond the range of its datatype") from None


def _refuse_first(name: str, array: np.ndarray, bad: np.ndarray, rule: str) -> None:
    """A BadRequest at the first True of `bad`, naming the element and its value."""
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), array.shape)
        raise invalid(f"input {name!r}: element {[int(i) for i in where]} is {array[where]}: {rule}")


def json_object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(f"{where}: must be a JSON object")
    return value


def invalid(message: str) -> BadRequest:
    return BadRequest(400, message)
