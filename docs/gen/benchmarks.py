"""Fills the generated blocks of docs/benchmarks.md from bench/results/*.json, so that no figure in the docs
is copied by hand. Each results file has one block in the page:

    <!-- results: NAME -->
    (generated: when and on what it was measured, the arguments, every figure)
    <!-- /results -->

The prose around the blocks is written by hand. A results file without a block gets one at the end of the
page. Run it with `make docs-gen`; tests/test_docs.py fails when a block differs from its file."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
# Other pages with blocks of their own (filled the same way; a results file lacking one gets none there)
OTHER_PAGES = (ROOT / "docs" / "fresh-data.md",)
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"<!-- results: (?P<name>[\w-]+) -->\n.*?<!-- /results -->", re.DOTALL)


def number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def records(node: Any, path: tuple[str, ...] = ()) -> tuple[list, list]:
    """Splits a results tree into scalars [(path, value)] and records [(path, {key: scalar})]: the
    innermost dicts that hold only scalars, which become the rows of tables."""
    scalars: list = []
    found: list = []
    if isinstance(node, dict) and node and path and all(not isinstance(v, dict) for v in node.values()):
        found.append((path, node))
    elif isinstance(node, dict):
        for key, value in node.items():
            inner_scalars, inner_records = records(value, (*path, str(key)))
            scalars += inner_scalars
            found += inner_records
    else:
        scalars.append((path, node))
    return scalars, found


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def figures_tables(figures: dict[str, Any]) -> list[str]:
    """Records with the same keys form one table, a row per record; a record alone is listed with the
    scalars. A table with more columns than rows is transposed, so that it stays narrow."""
    scalars, found = records(figures)
    groups: dict[tuple[str, ...], list] = {}
    for path, record in found:
        groups.setdefault(tuple(record), []).append((path, record))
    lines: list[str] = []
    for keys, members in groups.items():
        if len(members) == 1:
            path, record = members[0]
            scalars += [((*path, key), value) for key, value in record.items()]
            continue
        names = [" / ".join(path) for path, _ in members]
        if len(keys) > len(members) and len(keys) > 4:
            header = ["", *names]
            rows = [[key, *(number(record[key]) for _, record in members)] for key in keys]
        else:
            header = ["", *keys]
            rows = [
                [name, *(number(record[k]) for k in keys)]
                for name, (_, record) in zip(names, members, strict=True)
            ]
        lines += [*table(header, rows), ""]
    if scalars:
        rows = [[" / ".join(path), number(value)] for path, value in scalars]
        lines = [*table(["figure", "value"], rows), "", *lines]
    return lines


def arguments(args: dict[str, Any]) -> str:
    words = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words.append(f"{flag} {' '.join(map(str, value))}")
        else:
            words.append(f"{flag} {value}")
    return " ".join(words)


def block(name: str) -> str:
    results = json.loads((RESULTS / f"{name}.json").read_text())
    machine = results["machine"]
    flags = f" (flags: {machine['cpu_flags']})" if "cpu_flags" in machine else ""  # bf16, AMX, VNNI
    lines = [
        f"<!-- results: {name} -->",
        f"*From `bench/results/{name}.json`: measured {results['date'][:10]} on {machine['cpu']}{flags}, "
        f"{machine['cpus']} CPUs, torch {machine['torch']}, Python {machine['python']}; "
        f"`bench/{results['bench']}.py {arguments(results['arguments'])}`.*",
        "",
        *figures_tables(results["figures"]),
    ]
    return "\n".join(lines).rstrip() + "\n\n<!-- /results -->"


def render(page: str, append: bool = True) -> str:
    """The page with every block regenerated, and (`append`) a block appended for each results file it
    lacks."""
    names = sorted(path.stem for path in RESULTS.glob("*.json"))
    present = set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        present.add(name)
        if name not in names:
            return f"<!-- results: {name} -->\n*No bench/results/{name}.json yet.*\n<!-- /results -->"
        return block(name)

    page = BLOCK.sub(fill, page)
    for name in names if append else ():
        if name not in present:
            page = page.rstrip() + f"\n\n## {name}\n\n{block(name)}\n"
    return page


def main() -> int:
    PAGE.write_text(render(PAGE.read_text()))
    print(f"wrote {PAGE}")
    for other in OTHER_PAGES:
        other.write_text(render(other.read_text(), append=False))
        print(f"wrote {other}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
