"""Reading a config: YAML (anchors, merge keys), ${VAR} from the environment, --set overrides,
validation, errors that say `FILE: dotted.path: what is wrong`, and warnings logged in the same form."""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from ..urls import redact
from .root import Config, Problem, config_warnings, cross_check

log = logging.getLogger(__name__)

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Bounds on the YAML itself, far above any config (local_prod.yaml: 1,563 nodes, 7 levels deep), checked
# as the nodes are composed, before anything is built from them: aliases let a few hundred bytes stand for
# 10**9 nodes, and PyYAML, _unshare and pydantic recurse once per level of nesting.
MAX_NODES = 1_000_000  # once aliases are expanded
MAX_DEPTH = 64
# Bytes read of a YAML file (local_prod.yaml: 14 KB): /dev/zero, or a stream that never ends, would be read
# until memory runs out. Not only regular files: `--config <(envsubst < c.yaml)` is a pipe.
MAX_BYTES = 16 * 2**20


class ConfigError(UserError):
    """A config a user must fix; `problems` holds one (dotted path, message) per problem. A UserError, so
    that whatever reports a person's mistakes reports this one too (the CLI prints one line per problem)."""

    def __init__(self, file: str, problems: list[Problem]):
        self.file = file
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [
            f"{self.file}: {path}: {message}" if path else f"{self.file}: {message}"
            for path, message in self.problems
        ]


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Config:
    """Load, substitute, override and validate the YAML at `path`. `values`: dotted path -> value, set after
    the `overrides` as they are (no YAML parsing: `tune` sets the values its sampler drew)."""
    path = Path(path)
    data = _read_yaml(path)
    for override in overrides or []:
        _apply_override(data, override, str(path))
    for dotted, value in (values or {}).items():
        _set_dotted(data, dotted, value, str(path))
    try:
        config = Config.model_validate(data, context={"base_dir": str(path.resolve().parent)})
    except ValidationError as e:
        raise ConfigError(str(path), [_describe(error) for error in e.errors()]) from None
    problems = cross_check(config)
    if problems:
        raise ConfigError(str(path), problems)
    for where, message in config_warnings(config):
        log.warning("%s: %s: %s", path, where, message)
    return config


def dump_config(config: Config) -> str:
    """The resolved config (defaults filled) as YAML."""
    data = config.model_dump(mode="json")
    data["serving"]["engagement_weights"] = config.engagement_weights
    return yaml.safe_dump(data, sort_keys=False, width=120)


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "the config", substitute_env=True)
    if not isinstance(data, dict):
        raise ConfigError(
            str(path), [("", "the top level must be a mapping of sections (training, model, ...)")]
        )
    return data


def read_yaml(path: Path, what: str, substitute_env: bool = False) -> Any:
    """The YAML document at `path`, read under the bounds and checks a config is read with (_BoundedLoader:
    no alias bomb, no key given twice); ${VAR} replaced with `substitute_env`. ConfigError naming the file
    and line, `what` naming the file in the reader's words ("the search space")."""
    try:
        with path.open("rb") as f:
            content = f.read(MAX_BYTES + 1)
        if len(content) > MAX_BYTES:
            raise ConfigError(str(path), [("", f"more than {MAX_BYTES // 2**20} MB: not {what}")])
        text = content.decode()
    except OSError as e:
        raise ConfigError(str(path), [("", f"cannot read {what}: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [("", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None
    try:
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise ConfigError(str(path), [("", "the file is empty")])
            if substitute_env:
                _substitute_env(node, loader, str(path))
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [_yaml_problem(e)]) from None
    return _unshare(data)


class _Refused(yaml.MarkedYAMLError):
    """YAML that PyYAML would read, but no config is: it would take the command down, or lose a value."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what would exhaust memory or the stack, or drop a value silently:
    more than MAX_NODES nodes or MAX_DEPTH levels once aliases are expanded, an alias inside the node it
    names, a key given twice in one mapping, a scalar that cannot be converted. Each names its line."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._nodes = 0  # composed so far, an alias counting every node of what it names
        self._depth = 0  # of the node being composed
        self._expanded: dict[yaml.Node, tuple[int, int]] = {}  # composed node -> its (nodes, levels)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self._expanded:  # still being composed
                raise _Refused(f"the alias *{event.anchor} is inside the node it names", event.start_mark)
            self._count(*self._expanded[node], event.start_mark)
            return node
        before = self._nodes
        self._count(1, 1, event.start_mark)
        self._depth += 1
        node = super().compose_node(parent, index)
        self._depth -= 1
        levels = 1 + max((self._expanded[child][1] for child in _children(node)), default=0)
        self._expanded[node] = (self._nodes - before, levels)
        return node

    def _count(self, nodes: int, levels: int, mark: yaml.Mark) -> None:
        self._nodes += nodes
        if self._nodes > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} nodes once aliases are expanded", mark)
        if self._depth + levels > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", mark)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if (key.tag, key.value) in first:
                line = first[key.tag, key.value].start_mark.line + 1
                raise _Refused(
                    f"{key.value} is given twice in this mapping (first on line {line})", key.start_mark
                )
            first[key.tag, key.value] = key
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar PyYAML resolves but cannot convert: a date such as 2023-13-01, `!!int abc`, or an
        # integer of more than 4,300 digits, which Python refuses (with advice, after a ';', for programmers).
        try:
            return super().construct_object(node, deep)
        except ValueError as e:
            kind, reason = node.tag.rpartition(":")[2], str(e).partition(";")[0]
            raise _Refused(f"{node.value!r:.40} is not a valid {kind}: {reason}", node.start_mark) from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _yaml_problem(error: yaml.YAMLError) -> Problem:
    """One line, naming the line of the file, where PyYAML writes several with an excerpt."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return "", "not valid YAML: " + " ".join(str(error).split())
    where = f"line {error.problem_mark.line + 1}"
    if isinstance(error, _Refused):
        return where, error.problem
    return where, "not valid YAML: " + "; ".join(filter(None, [error.context, error.problem]))


def _substitute_env(
    node: yaml.Node, loader: yaml.SafeLoader, file: str, seen: set[int] | None = None
) -> None:
    """Replace ${VAR} in every scalar, before the document is built, so the error can name the line."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: already done
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if "${" not in node.value:
            return

        def value_of(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    file, [(f"line {node.start_mark.line + 1}", f"environment variable {name} is not set")]
                )
            return os.environ[name]

        node.value = _ENV_VAR.sub(value_of, node.value)
        if node.style is None:  # a plain scalar: let `${STEPS}` -> `100` become an int again
            node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _substitute_env(child, loader, file, seen)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _substitute_env(key, loader, file, seen)
            _substitute_env(value, loader, file, seen)


def _unshare(value: Any) -> Any:
    """A copy in which YAML aliases no longer share objects, so an override changes one place only."""
    if isinstance(value, dict):
        return {k: _unshare(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshare(v) for v in value]
    return value


def _apply_override(data: dict[str, Any], override: str, file: str) -> None:
    """`a.b.c=value`, value parsed as YAML. Keys may contain dots (task names): at each level the
    longest run of segments that names an existing key wins."""
    dotted, sep, raw = override.partition("=")
    if not sep or not dotted:
        raise ConfigError(file, [("--set", f"{override!r} is not of the form dotted.path=value")])
    try:
        value = yaml.load(raw, Loader=_BoundedLoader)
    except yaml.YAMLError as e:
        _, problem = _yaml_problem(e)
        raise ConfigError(file, [("--set", f"{redact(repr(override)):.80}: {problem}")]) from None
    _set_dotted(data, dotted, value, file)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, file: str) -> None:
    segments = dotted.split(".")
    # As deep as a YAML file may nest: finding the longest key at each level of 60,000 took minutes.
    if len(segments) > MAX_DEPTH:
        raise ConfigError(file, [("--set", f"{dotted[:40]}...: a path of more than {MAX_DEPTH} segments")])
    node = data
    while True:
        if not isinstance(node, dict):
            raise ConfigError(file, [(dotted, "--set goes through a value that is not a mapping")])
        key, used = _longest_key(node, segments)
        segments = segments[used:]
        if not segments:
            node[key] = value
            return
        if node.get(key) is None:
            node[key] = {}
        node = node[key]


def _longest_key(node: dict[str, Any], segments: list[str]) -> tuple[str, int]:
    for n in range(len(segments), 0, -1):
        key = ".".join(segments[:n])
        if key in node:
            return key, n
    return segments[0], 1


def _describe(error: dict[str, Any]) -> Problem:
    loc = error["loc"]
    path = _dotted(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return path, "unknown field" + _suggestion(loc)
    if kind == "missing":
        return path, "required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind not in ("one_of",) and not isinstance(error.get("input"), dict | list):
        message += f" (got {redact(repr(error.get('input'))):.80})"
    return path, message


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggestion(loc: tuple[Any, ...]) -> str:
    """Name the allowed fields of the section that holds the unknown one, closest first."""
    model = _model_at(Config, loc[:-1])
    if model is None:
        return ""
    allowed = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return f" (allowed: {', '.join(allowed)}){hint}"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk the config classes along an error location (through dicts, lists and optionals)."""
    annotation: Any = model
    for part in loc:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        else:
            annotation = _element_type(annotation)
        annotation = _strip_optional(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if len(args) == 1 and type(None) in getattr(annotation, "__args__", ()):
        return args[0]
    return annotation


def _element_type(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", ())
    return args[-1] if args else None
