"""The floors of the package run one way: config < data < model < train / eval < serve < release < cli.

A module may import from its own floor or any floor below, never above; eval never imports train (both
sit on the same floor and share the ground-floor modules runtime.py and checkpoint.py instead). The
ground floor (errors, atomic, schema, runtime, memory, urls, run_folder) imports nothing of the package above
it (run_folder takes a path, never a Config); checkpoint imports nothing above config and data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "heavyranker"

# Top-level modules are named by their stem, packages by their folder.
FLOORS = {
    "errors": 0,
    "urls": 0,
    "atomic": 0,
    "schema": 0,
    "memory": 0,
    "runtime": 0,
    "run_folder": 0,
    "cpu": 0,
    "config": 1,
    "data": 2,
    "checkpoint": 2,
    "model": 3,
    "train": 4,
    "eval": 4,
    "serve": 5,
    "release": 6,
    "demo": 6,
    "tune": 6,
    "cli": 7,
    "handlers": 7,
    "__main__": 7,
}


def _room(parts: tuple[str, ...]) -> str:
    """The floor's name of a module given its path parts under the package."""
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


def imported_rooms(source: str, parts: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, room) of every import of a heavyranker module in `source`, a file at `parts`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package
                base = list(parts[:-1])[: len(parts) - node.level]
                target = base + (module.split(".") if module else [node.names[0].name])
            elif module.startswith("heavyranker."):
                target = module.split(".")[1:]
            else:
                continue
            if target:
                found.append((node.lineno, target[0]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("heavyranker."):
                    found.append((node.lineno, alias.name.split(".")[1]))
    return found


def back_arrows(root: Path) -> list[str]:
    arrows = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        here = _room(parts)
        for line, there in imported_rooms(path.read_text(), parts):
            there = there.removesuffix(".py")
            if there not in FLOORS or here not in FLOORS or there == here:
                continue
            if FLOORS[there] > FLOORS[here] or (here, there) == ("eval", "train"):
                arrows.append(f"{path.relative_to(root)}:{line}: {here} imports {there}")
    return arrows


def test_every_module_has_a_floor():
    rooms = {_room(p.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert rooms <= set(FLOORS), f"give these a floor: {sorted(rooms - set(FLOORS))}"


def test_no_import_points_up_a_floor():
    assert back_arrows(PACKAGE) == []


@pytest.mark.parametrize(
    "file, source",
    [
        ("config/root.py", "from ..data.schema import load_schema\n"),
        ("eval/evaluator.py", "from ..train.loop import Trainer\n"),
        ("data/dataset.py", "from heavyranker.model import Ranker\n"),
        ("runtime.py", "from .eval.metrics import MetricAccumulator\n"),
        ("runtime.py", "from .data.files import shard_files\n"),
        ("runtime.py", "from .config import Config\n"),
        ("eval/compare.py", "from ..demo.baselines import read_rows\n"),
        ("run_folder.py", "from .config import Config\n"),
        ("model/mlp.py", "import heavyranker.serve.app\n"),
    ],
)
def test_a_back_arrow_is_found(tmp_path, file, source):
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert len(back_arrows(tmp_path)) == 1
