"""Fills the generated blocks of docs/benchmarks.md from bench/results/*.json, so that no figure in the docs
is copied by hand. Each results file has one block in the page:

    <!-- results: NAME -->
    (generated: when and on what it was measured, the arguments, every figure)
    <!-- /results -->

The prose around the blocks is written by hand. A results file without a block gets one at the end of the
page. docs/tuning.md's tables of issue 27's protocol (bench/quality_protocol.py) are filled the same way, in
blocks `<!-- protocol: WORLD -->`. Run it with `make docs-gen`; tests/test_docs.py fails when a block differs
from its file."""

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
TUNING_PAGE = ROOT / "docs" / "tuning.md"
PROTOCOL = re.compile(r"<!-- protocol: (?P<world>[\w-]+) -->\n.*?<!-- /protocol -->", re.DOTALL)
SETTINGS = {
    "defaults": "defaults",
    "demo_tuned": "tuned on the demo",
    "holdout_tuned": "tuned on the holdout",
    "mmoe": "mmoe, the demo's rates",
}


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


def gap(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def protocol_block(world: str) -> str:
    """A world's tables of bench/results/quality_protocol.json: per task the test positives, the truth's,
    the baselines' and each setting's RCE (its seeds' mean and range), the medians of the gap closed and the
    aims; then each one's gap closed per task and compare's verdicts."""
    path = RESULTS / "quality_protocol.json"
    results = json.loads(path.read_text()) if path.is_file() else {"figures": {}}
    if world not in results["figures"]:
        return (
            f"<!-- protocol: {world} -->\n*No figures of this world in {path.name} yet.*\n<!-- /protocol -->"
        )
    figures = results["figures"][world]
    settings = [s for s in SETTINGS if s in figures] + [s for s in figures if s not in SETTINGS]
    first = figures[settings[0]]
    names = [SETTINGS.get(s, s) for s in settings]
    rows, verdicts = [], []
    for task, row in first["tasks"].items():
        ours = [figures[s]["tasks"][task] for s in settings]
        baselines = (row[k] for k in ("truth_rce", "logistic_regression_rce", "lightgbm_rce"))
        rows.append(
            [task, number(row["positives"]), *(f"{v:.2f}" for v in baselines)]
            + [f"{r['rce']:.2f} ({min(r['rce_per_seed']):.2f} – {max(r['rce_per_seed']):.2f})" for r in ours]
        )
        verdicts.append(
            [task, gap(row["lightgbm_gap_closed_vs_logistic_regression"])]
            + [gap(r["gap_closed_vs_logistic_regression"]) for r in ours]
            + [
                f"{r['seeds_above_below_logistic_regression']} / {r['seeds_above_below_lightgbm']}"
                for r in ours
            ]
            + [r.get("seeds_above_below_defaults", "") for r in ours[1:]]
        )
    medians = [
        "median RCE gap closed vs LR",
        "",
        "",
        "",
        gap(first["lightgbm_median_gap_closed_vs_logistic_regression"]),
        *(gap(figures[s]["median_gap_closed_vs_logistic_regression"]) for s in settings),
    ]
    seeds = ", ".join(str(s) for s in first["seeds"])
    lines = [
        f"<!-- protocol: {world} -->",
        f"*From `bench/results/quality_protocol.json`: measured {results['date'][:10]} on "
        f"{results['machine']['cpu']}; {first['test_rows']:,} test rows; ranker seeds {seeds} (mean, and "
        f"range over the seeds); compare's bootstrap with {first['resamples']} resamples.*",
        "",
        *table(["task", "positives", "truth", "LR", "LightGBM", *names], [*rows, medians]),
        "",
        *(aims(n, figures[s], first) for n, s in zip(names, settings, strict=True)),
        "",
        "The RCE gap closed against the logistic regression, and the seeds above / below it and LightGBM "
        "(+n -m: the 95% interval of compare's paired bootstrap of the RCE excludes 0):",
        "",
        *table(
            ["task", "LightGBM: gap closed", *(f"{n}: gap closed" for n in names)]
            + [*(f"{n}: seeds vs LR / LightGBM" for n in names), *(f"{n}: vs defaults" for n in names[1:])],
            verdicts,
        ),
    ]
    return "\n".join(lines) + "\n<!-- /protocol -->"


def aims(name: str, setting: dict[str, Any], defaults: dict[str, Any]) -> str:
    """Issue 27's aims for one setting, from its figures: its median gap closed against LightGBM's, and the
    tasks whose mean RCE is below LightGBM's (with 500 test positives or more) or the regression's."""
    ours = setting["median_gap_closed_vs_logistic_regression"]
    theirs = defaults["lightgbm_median_gap_closed_vs_logistic_regression"]
    median_met = ours is not None and theirs is not None and ours >= theirs
    below_gbm = ", ".join(setting["tasks_below_lightgbm_with_500_positives"]) or "none"
    below_lr = ", ".join(setting["tasks_below_logistic_regression"]) or "none"
    return (
        f"- **{name}**: median gap closed {gap(ours)}, LightGBM's {gap(theirs)} "
        f"({'at least' if median_met else 'below'}); mean RCE below LightGBM's on a task with 500 positives "
        f"or more: {below_gbm}; below the logistic regression's: {below_lr}."
    )


def render_tuning(page: str) -> str:
    """docs/tuning.md with every protocol block regenerated."""
    return PROTOCOL.sub(lambda match: protocol_block(match["world"]), page)


def main() -> int:
    PAGE.write_text(render(PAGE.read_text()))
    print(f"wrote {PAGE}")
    for other in OTHER_PAGES:
        other.write_text(render(other.read_text(), append=False))
        print(f"wrote {other}")
    TUNING_PAGE.write_text(render_tuning(TUNING_PAGE.read_text()))
    print(f"wrote {TUNING_PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
