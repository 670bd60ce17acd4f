"""What a parameter's drawn value sets in the config, and how a trial's settings are shown to people.

A choice that is a mapping sets several fields below its parameter's path together: each key (a field, or a
dotted path below the parameter's path) is set as `--set` sets it, its value replacing the field's value
whole; the fields the mapping does not name keep the config's values. Any other value sets the path itself.

    model: {choices: [{multi_task_type: share_all}, {multi_task_type: mmoe, backbone: null, experts: {...}}]}
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable
from typing import Any

import yaml

from ..errors import UserError


def flow_yaml(value: Any) -> str:
    """`value` as one line of YAML (a mapping's keys sorted): a choice's label; what `--set` reads."""
    return yaml.safe_dump([value], default_flow_style=True, width=math.inf).strip()[1:-1]


def settings(targets: Iterable[str], value: Any) -> dict[str, Any]:
    """Dotted config path -> value, for `value` drawn by a parameter naming `targets`."""
    if isinstance(value, dict):
        return {f"{target}.{key}": field for target in targets for key, field in value.items()}
    return dict.fromkeys(targets, value)


def check_mapping(at: str, choice: dict[Any, Any]) -> None:
    """A mapping choice's keys are dotted paths, none of them inside another (the order of setting them
    would decide the config)."""
    for key in choice:
        if not isinstance(key, str) or not key or "*" in key:
            raise UserError(
                f"{at}: {key!r}: a mapping choice's keys are fields (dotted paths, no *) below it"
            )
    clash = next(((a, b) for a in choice for b in choice if a != b and inside(a, b)), None)
    if clash:
        raise UserError(f"{at}: {clash[0]} lies inside {clash[1]}; set it in {clash[1]}'s value instead")


def inside(path: str, other: str) -> bool:
    """Whether dotted `path` is `other` or a field below it."""
    return path == other or path.startswith(other + ".")


def refuse_conflicts(where: str, fields: dict[str, tuple[bool, set[str]]]) -> None:
    """`fields`: param -> (whether a choice of it is a mapping, the dotted paths it may set). A mapping param
    and another param that set the same field, or one inside the other, are refused: the later would silently
    undo part of the earlier's choice (two other params keep their rule: the later one wins)."""
    params = list(fields)
    for n, first in enumerate(params):
        for second in params[n + 1 :]:
            if not (fields[first][0] or fields[second][0]):
                continue
            for a in sorted(fields[first][1]):
                for b in sorted(fields[second][1]):
                    if inside(a, b) or inside(b, a):
                        raise UserError(
                            f"{where}: params.{first} and params.{second} both set {min(a, b, key=len)}; "
                            "vary it in one of them (a mapping choice can set it with the other fields)"
                        )


def as_overrides(values: dict[str, Any]) -> list[str]:
    """`--set path=value` arguments, quoted for a POSIX shell, that give a config these values."""
    return [f"--set {shlex.quote(f'{path}={flow_yaml(value)}')}" for path, value in values.items()]
