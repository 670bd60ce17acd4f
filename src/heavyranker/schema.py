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
        specs = [FeatureSpec(e["feature_name"], e["dtype"], int(e["length"])) for e in entries]
    except OSError as e:
        raise SchemaError(f"{path}: cannot read the schema: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SchemaError(
            f"{path}: not a schema (a JSON object with a 'schema' list of "
            f"{{feature_name, dtype, length}}): {e!r}"
        ) from None
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise SchemaError(
                f"{path}: feature {spec.name}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}"
            )
        if spec.length < 1:
            raise SchemaError(f"{path}: feature {spec.name}: length must be positive, got {spec.length}")
    return {spec.name: spec for spec in specs}
