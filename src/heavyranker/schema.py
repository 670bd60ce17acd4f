"""The seg-dense feature schema: a JSON list of {feature_name, dtype, length}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from .errors import UserError

Dtype = Literal["float_list", "int64_list", "bytes_list"]
DTYPES: tuple[str, ...] = ("float_list", "int64_list", "bytes_list")


class SchemaError(UserError):
    """A schema file a person must fix: the CLI prints it on one line, the config check names its field."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dtype: Dtype
    length: int  # values per record; a record may not hold another count


def load_schema(path: str) -> dict[str, FeatureSpec]:
    """Feature name -> spec, in file order."""
    try:
        with open(path) as f:
            entries = json.load(f)["schema"]
        if not isinstance(entries, list):
            raise TypeError(f"'schema' is {type(entries).__name__}, not a list")
        specs = [FeatureSpec(e["feature_name"], e["dtype"], e["length"]) for e in entries]
    except OSError as e:
        raise SchemaError(f"{path}: cannot read the schema: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaError(
            f"{path}: not a schema (a JSON object with a 'schema' list of "
            f"{{feature_name, dtype, length}}): {e!r}"
        ) from None
    named: dict[str, FeatureSpec] = {}
    for spec in specs:
        _check(path, spec)
        if spec.name in named:  # a dict would keep the last of the two without a word
            raise SchemaError(f"{path}: feature {spec.name} is named twice")
        named[spec.name] = spec
    return named


def _check(path: str, spec: FeatureSpec) -> None:
    if not isinstance(spec.name, str) or not spec.name:
        raise SchemaError(f"{path}: feature_name {json.dumps(spec.name)} is not a non-empty string")
    if spec.dtype not in DTYPES:
        raise SchemaError(
            f"{path}: feature {spec.name}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}"
        )
    # Not int(): it turns 2.5 into 2, "3" and true into numbers.
    if isinstance(spec.length, bool) or not isinstance(spec.length, int):
        raise SchemaError(
            f"{path}: feature {spec.name}: length must be a whole number, got {json.dumps(spec.length)}"
        )
    if spec.length < 1:
        raise SchemaError(f"{path}: feature {spec.name}: length must be positive, got {spec.length}")
