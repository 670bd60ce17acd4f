"""A ranking request's JSON body -> candidate ids and one numpy array per model input, or a BadRequest
whose message names the candidate (index and id) and the field.

    {"candidates": [{"id": "t1", "features": {"continuous": [0.5, ...], "binary": [0, 1, ...], ...}}, ...]}

Speed matters: 1,000 candidates of local_prod's model are 2.8 million numbers. pydantic_core's JSON parser
(jiter) reads them 5x faster than the json module, and numpy converts each input's rows in one call; the
structure (objects, ids, vector lengths) is checked per vector, never per value. Validating the same body
with a pydantic model of list[float] costs more than parsing and converting it (measured on 55 MB: 409 ms
vs 218 ms + 75 ms). Values are checked per value only to say where a conversion failed, or when the body
holds `true`/`false` somewhere, because numpy would silently read a boolean as 1 or 0. The flags (the input
data.columns.FLAGS names) are 0 or 1, as the data path checks them: the model would take 2**62 as it is.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pydantic_core
import torch

from ..data.columns import FLAGS
from .scorer import InputSpec

CandidateId = str | int
# Far beyond a key a caller joins on (a UUID has 36 characters), and within the body limit's allowance
# per candidate: a request's size, and its response's, is its values'.
MAX_ID_CHARS = 256
SHOWN_CHARS = 64


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_candidates(
    body: bytes | bytearray, inputs: Sequence[InputSpec], max_candidates: int
) -> tuple[list[CandidateId], dict[str, np.ndarray]]:
    """Candidate ids in request order and, per input, an array [candidates, *shape] of its numpy dtype
    (float32 for the float inputs, the torch dtype's own otherwise)."""
    try:
        document = pydantic_core.from_json(body)
    except ValueError as e:
        raise BadRequest(400, f"the body is not valid JSON: {e}") from None
    candidates = _candidate_list(document, max_candidates)
    ids, rows = _structure(candidates, inputs)
    _check_unique_keys(body, document, ids)
    booleans = b"true" in body or b"false" in body  # a cheap, conservative test: ids may hold the words too
    return ids, {spec.name: _column(rows[spec.name], spec, ids, booleans) for spec in inputs}


def _candidate_list(document: object, max_candidates: int) -> list:
    if not isinstance(document, dict):
        raise _invalid(f'the body must be a JSON object {{"candidates": [...]}}, not {_kind(document)}')
    unknown = [key for key in document if key != "candidates"]
    if unknown:
        raise _invalid(f"{_shown(unknown[0])}: unknown field (the body has one field, candidates)")
    if "candidates" not in document:
        raise _invalid("candidates: missing")
    candidates = document["candidates"]
    if not isinstance(candidates, list):
        raise _invalid(f"candidates: must be a list of candidates, not {_kind(candidates)}")
    if len(candidates) > max_candidates:
        raise BadRequest(413, f"candidates: {len(candidates)} of them, at most {max_candidates} per request")
    return candidates


def _structure(candidates: list, inputs: Sequence[InputSpec]) -> tuple[list[CandidateId], dict[str, list]]:
    """Checks every candidate's fields and vector lengths; returns the ids and each input's rows."""
    names = [spec.name for spec in inputs]
    ids: list[CandidateId] = []
    rows: dict[str, list] = {name: [] for name in names}
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, dict):
            raise _invalid(f"candidates[{i}]: must be an object with id and features, not {_kind(candidate)}")
        cid = _id(i, candidate)
        where = _candidate(i, cid)
        unknown = [key for key in candidate if key not in ("id", "features")]
        if unknown:
            raise _invalid(f"{where}: {_shown(unknown[0])}: unknown field (a candidate has id and features)")
        features = candidate.get("features")
        if not isinstance(features, dict):
            problem = "missing" if features is None else f"must be an object, not {_kind(features)}"
            raise _invalid(f"{where}: features: {problem}")
        unknown = [key for key in features if key not in rows]
        if unknown:
            raise _invalid(
                f"{where}: features.{_shown(unknown[0])}: not an input of this model "
                f"(its inputs: {', '.join(names)})"
            )
        for spec in inputs:
            if spec.name not in features:
                raise _invalid(f"{where}: features.{spec.name}: missing")
            value, field = features[spec.name], f"{where}: features.{spec.name}"
            if spec.shape:
                if type(value) is not list:
                    raise _invalid(f"{field}: must be a list of {spec.width} numbers, not {_kind(value)}")
                if len(value) != spec.width:
                    raise _invalid(f"{field}: {len(value)} values, the model takes {spec.width}")
            elif type(value) is list:
                raise _invalid(f"{field}: must be one number, not a list")
            rows[spec.name].append(value)
        ids.append(cid)
    return ids, rows


def _id(i: int, candidate: dict) -> CandidateId:
    if "id" not in candidate:
        raise _invalid(f"candidates[{i}]: id: missing")
    problem = id_problem(candidate["id"])
    if problem:
        raise _invalid(f"candidates[{i}]: id: {problem}")
    return candidate["id"]


def id_problem(cid: object) -> str | None:
    """What is wrong with a parsed candidate id, or None."""
    if type(cid) not in (str, int):
        return f"must be a string or an integer, not {_kind(cid)}"
    if type(cid) is str and len(cid) > MAX_ID_CHARS:
        return f"{len(cid)} characters, at most {MAX_ID_CHARS}"
    if type(cid) is int and not -(1 << 63) <= cid < 1 << 64:
        return f"{_shown(str(cid))} does not fit in 64 bits (signed or unsigned)"
    return None


GIVEN_TWICE = "given twice (a key may appear once in an object)"
Path = list[str | int]  # keys and list indices from the document's top


def _check_unique_keys(body: bytes | bytearray, document: object, ids: list[CandidateId]) -> None:
    """A key given twice is a 422 (duplicate_key), named as the other messages name a candidate."""
    path = duplicate_key(body, document, "the body")
    if path is None:
        return
    where = dotted(path)
    if len(path) > 2:  # candidates, i, ...
        where = f"{_candidate(int(path[1]), ids[int(path[1])])}: {dotted(path[2:])}"
    raise _invalid(f"{where}: {GIVEN_TWICE}")


def duplicate_key(text: bytes | bytearray, document: object, what: str) -> Path | None:
    """Where the first key that the JSON `text` (`what`, for a message) gives twice in one object is, or
    None. `document` is the text as parsed: a parser keeps a repeated key's last value silently, so a
    request would not mean what its writer checked, nor what a proxy that reads the first value saw.

    Found by counting: each ':' outside a string separates a key from its value, so the text holds as many
    ':' as the document has keys and ':' in its strings (keys, ids), unless a key is repeated or a ':' is
    escaped (\\u003a). Counting costs about 3% of the parse (0.1 s of 2.8 s on 2,048 candidates of 2,800
    values, 48 MB); only a text that fails the count is parsed again, by the json module (4x slower), to
    find the key."""
    escaped = b"\\" in text and (b"\\u003a" in text or b"\\u003A" in text)
    if text.count(b":") == _colons(document) and not escaped:
        return None
    try:
        exact = json.loads(text, object_pairs_hook=_Object.of)
    except ValueError as e:  # read by pydantic_core already, but a parser may refuse what another reads
        raise BadRequest(400, f"{what} is not valid JSON: {e}") from None
    return _duplicated(exact, [])


def dotted(path: Path) -> str:
    """A path as messages write it: inputs[0].parameters."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path).removeprefix(".")


def _colons(value: object) -> int:
    """The ':' that a JSON text of `value` holds outside escapes: one per key, and those in its strings. A
    list whose first item is a number is taken for a list of numbers, whose items are too many to look at
    one by one: were it not one, the count falls short and the text is parsed again."""
    if isinstance(value, str):
        return value.count(":")
    if isinstance(value, dict):
        return sum(1 + key.count(":") + _colons(item) for key, item in value.items())
    if isinstance(value, list) and value and isinstance(value[0], dict | list | str):
        return sum(map(_colons, value))
    return 0


class _Object(dict):
    """A JSON object that remembers the first key its text gives twice (built by json's pairs hook)."""

    duplicate: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, object]]) -> _Object:
        made = cls(pairs)
        if len(made) < len(pairs):
            made.duplicate = next(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        return made


def _duplicated(value: object, path: Path) -> Path | None:
    """The path of the first key given twice in `value` (built with _Object), depth first; None if none."""
    if isinstance(value, _Object) and value.duplicate is not None:
        return [*path, value.duplicate]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(item, (dict, list)):
            found = _duplicated(item, [*path, key])
            if found:
                return found
    return None


def _column(rows: list, spec: InputSpec, ids: list[CandidateId], booleans: bool) -> np.ndarray:
    integer = not spec.dtype.is_floating_point
    try:
        array = np.array(rows)  # dtype inferred: a string, null or object among the numbers shows in it
    except (ValueError, TypeError, OverflowError):
        array = None
    # Lists in place of numbers, alike in every row, make a regular array of one more dimension.
    regular = array is not None and array.ndim == 1 + len(spec.shape)
    if not regular or array.dtype.kind not in ("i" if integer else "if") or booleans:
        _check_values(rows, spec, ids)
        array = np.array(rows, dtype=np.int64 if integer else np.float64)
    array = array.reshape(len(rows), *spec.shape)  # also when there are no rows
    if integer:
        array = _integers(array, spec, ids)
    else:
        with np.errstate(over="ignore"):  # beyond float32's range is inf: allowed or rejected just below
            array = array.astype(np.float32)
        if not spec.allow_non_finite:
            _refuse_first(~np.isfinite(array), rows, spec, ids, "this input must be finite (as float32)")
    if spec.name == FLAGS:
        _refuse_first((array != 0) & (array != 1), rows, spec, ids, "a binary feature is 0 or 1")
    return array


def _refuse_first(bad: np.ndarray, rows: list, spec: InputSpec, ids: list[CandidateId], rule: str) -> None:
    """A BadRequest at the first True of `bad` ([candidates] or [candidates, width]), with the value sent."""
    if bad.any():
        i, j = _first(bad)
        value = rows[i][j] if spec.shape else rows[i]
        raise _invalid(f"{_field(spec, ids, i, j)}: {value!r}: {rule}")


def _integers(array: np.ndarray, spec: InputSpec, ids: list[CandidateId]) -> np.ndarray:
    info = torch.iinfo(spec.dtype) if spec.dtype != torch.bool else None
    low, high = (info.min, info.max) if info else (0, 1)
    bad = (array < low) | (array > high)
    if bad.any():
        i, j = _first(bad)
        raise _invalid(
            f"{_field(spec, ids, i, j)}: {array[i, j] if spec.shape else array[i]} is outside {low}..{high}"
        )
    return array.astype(np.int64)


def _check_values(rows: list, spec: InputSpec, ids: list[CandidateId]) -> None:
    """Raises BadRequest at the first value that is not a JSON number of the input's kind."""
    integer = not spec.dtype.is_floating_point
    for i, row in enumerate(rows):
        for j, value in enumerate(row if spec.shape else [row]):
            kind = type(value)
            if kind is int and -(1 << 63) <= value < (1 << 63):
                continue
            if kind is float and not integer:
                continue
            if kind is int:
                problem = f"{_shown(str(value))} is outside the range of int64"
            elif kind is float:
                problem = f"{value!r} is not an integer"
            else:
                problem = f"{_kind(value)} is not a number"
            raise _invalid(f"{_field(spec, ids, i, j)}: {problem}")


def _invalid(message: str) -> BadRequest:
    return BadRequest(422, message)


def _candidate(i: int, cid: CandidateId) -> str:
    return f"candidates[{i}] (id {cid!r})"


def _field(spec: InputSpec, ids: list[CandidateId], i: int, j: int) -> str:
    """Value j of candidate i's input `spec`, as a message names it."""
    return f"{_candidate(i, ids[i])}: features.{spec.name}" + (f"[{j}]" if spec.shape else "")


def _first(bad: np.ndarray) -> tuple[int, int]:
    """(candidate, position) of the first True of a [candidates] or [candidates, width] mask."""
    index = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return int(index[0]), int(index[1]) if len(index) > 1 else 0


def _shown(text: str) -> str:
    """A client's text (a key, a long number) as a message repeats it: its start, if it is long."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _kind(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)
