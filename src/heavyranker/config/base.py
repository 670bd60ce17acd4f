"""Shared pieces of the config models: strictness, numbers, one-of groups, paths relative to the YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from ..urls import credentials_in

# The description of each field kept only so that the reference's YAML loads; loading a config that sets
# one logs a warning (root.config_warnings finds them by this description).
NO_EFFECT = "accepted for compatibility with the reference; has no effect"


class StrictModel(BaseModel):
    """Every config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def exactly_one_of(model: BaseModel, *fields: str) -> str:
    """Return the one field of `fields` that is set; raise a readable error otherwise."""
    chosen = [f for f in fields if getattr(model, f) is not None]
    if len(chosen) != 1:
        got = ", ".join(chosen) if chosen else "none"
        raise PydanticCustomError(
            "one_of",
            "exactly one of {fields} must be set (got: {got})",
            {"fields": ", ".join(fields), "got": got},
        )
    return chosen[0]


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise PydanticCustomError("bool_number", "a boolean is not a number")
    return value


# Numbers. A boolean is never one: YAML reads `true`, `yes` and `on` as booleans, and pydantic would take
# them as 1. Integers are strict: no float (`1.0e+12`), no string. Floats take strings, as PyYAML reads
# `1e-3` as one (its floats need a dot), but neither NaN nor an infinity, which no field can use.
# AllowInfNan comes first so that it is checked in the float schema itself, before any bound of a field.
Float = Annotated[float, AllowInfNan(False), BeforeValidator(_not_a_boolean)]
Count = Annotated[int, Strict(), Field(ge=1)]  # sizes, counts, steps
NonNegative = Annotated[int, Strict(), Field(ge=0)]  # column indices, tolerances, step boundaries
# Bounds on what the model allocates as it is built, before any data is read. A layer between two widths
# of 2**15 holds 2**30 weights (4 GiB of float32; Adam keeps two more copies); the seed's widest is 2048.
MAX_WIDTH = 2**15
Width = Annotated[Count, Field(le=MAX_WIDTH)]  # layer sizes, embedding dimensions


def _resolve_path(value: str, info: ValidationInfo) -> str:
    """Relative paths (and globs) are relative to the folder of the YAML file that names them; a URL
    (s3://bucket/..., file:///...) is left as it is, unless it holds credentials."""
    problem = credentials_in(value)
    if problem:  # the loader's message shows the value redacted
        raise PydanticCustomError(
            "url_credentials",
            "a URL must not hold {problem} (it would be logged); give credentials the way its back-end reads "
            "them (environment, config files)",
            {"problem": problem},
        )
    base = (info.context or {}).get("base_dir")
    if base is None or Path(value).is_absolute() or "://" in value:
        return value
    return os.path.normpath(os.path.join(base, value))


def _must_exist(value: str, info: ValidationInfo) -> str:
    if not Path(value).is_file():
        raise PydanticCustomError("file_not_found", "file not found: {path}", {"path": value})
    return value


# A path in the config, resolved against the YAML file's folder.
ConfigPath = Annotated[str, AfterValidator(_resolve_path)]
# The same, and the file must exist when the config is loaded.
ExistingFile = Annotated[str, AfterValidator(_resolve_path), AfterValidator(_must_exist)]
