"""The docs: the generated pages match what they are generated from, the site builds in strict mode (every
link and anchor resolves), and the README stays a guide that starts with the two set-up commands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from types import ModuleType

import pytest
from pydantic import BaseModel, Field

from tests.conftest import REPO

REGENERATE = "run `make docs-gen` and commit the result"


def generator(name: str) -> ModuleType:
    """A script of docs/gen/, which is not a package."""
    spec = importlib.util.spec_from_file_location(f"docs_gen_{name}", REPO / "docs" / "gen" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config_reference = generator("config_reference")
benchmarks = generator("benchmarks")


def test_every_config_field_has_a_description():
    missing = config_reference.missing_descriptions()
    assert not missing, f"give these config fields a description= (the reference shows it): {missing}"


def test_a_field_without_a_description_is_found():
    class Inner(BaseModel):
        """Documented by its docstring."""

        bare: int = 0

    class Root(BaseModel):
        inner: Inner = Inner()
        described: int = Field(0, description="Has one.")

    assert config_reference.missing_descriptions(Root) == ["Inner.bare"]


def test_configuration_reference_is_current():
    page = config_reference.PAGE.read_text()
    assert page == config_reference.render(), f"docs/configuration.md is stale: {REGENERATE}"


def test_configuration_reference_shows_bounds_defaults_and_one_of_groups():
    page = config_reference.render()
    # global_batch_size: an integer from 1 to 2**20, no default.
    assert "| `global_batch_size` | int (>= 1, <= 1048576) | *required* |" in page
    assert "| `file_batch_size` | int (>= 1) | `16` | Files read at once, their records interleaved." in page
    assert "Exactly one of: `inputs`, `explicit_date_inputs`, `explicit_datetime_inputs`, `kafka`." in page
    assert "At `train_data`, `validation_data.<split>`." in page
    assert '| `metric` | one of: `auroc`, `rce` | `"rce"` |' in page


def test_benchmark_tables_are_current():
    page = benchmarks.PAGE.read_text()
    stale = f"a figure in docs/benchmarks.md differs from bench/results: {REGENERATE}"
    assert page == benchmarks.render(page), stale
    for other in benchmarks.OTHER_PAGES:
        assert other.read_text() == benchmarks.render(other.read_text(), append=False), stale


def test_every_results_file_has_its_block():
    page = benchmarks.PAGE.read_text()
    for results in (REPO / "bench" / "results").glob("*.json"):
        assert f"<!-- results: {results.stem} -->" in page, results.name


def test_tuning_tables_are_current_and_a_changed_figure_is_caught():
    page = benchmarks.TUNING_PAGE.read_text()
    assert page == benchmarks.render_tuning(page), f"a table in docs/tuning.md differs: {REGENERATE}"
    tampered = page.replace(
        "<!-- protocol: holdout -->\n", "<!-- protocol: holdout -->\n| is_favorited | 1 |\n"
    )
    assert tampered != page and benchmarks.render_tuning(tampered) == page


def test_a_figure_copied_wrong_is_caught():
    page = benchmarks.PAGE.read_text()
    results = json.loads((REPO / "bench" / "results" / "data_throughput.json").read_text())
    # The figure as the results file holds it, formatted by hand as the tables show examples/s.
    figure = results["figures"]["examples_per_cpu_s"]["cache, default parallelism"]
    row = f"| cache, default parallelism | {figure:,.0f} |"
    assert row in page
    tampered = page.replace(row, "| cache, default parallelism | 1 |")
    assert benchmarks.render(tampered) != tampered
    assert benchmarks.render(tampered) == page


def test_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (a dev extra: pip install -e '.[dev]')")
    pytest.importorskip("material", reason="mkdocs-material is not installed (in the dev extras)")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    assert (tmp_path / "configuration" / "index.html").is_file()


README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_set_up_commands():
    first_block = re.search(r"```sh\n(.*?)```", README, re.DOTALL)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block[1].splitlines()]
    assert commands == ["make demo", "make test"]
    assert README.index("```sh") < README.index("\n## "), "the commands come before the first section"


def test_readme_is_a_guide_of_at_most_150_lines():
    assert len(README.splitlines()) <= 150


def test_readme_links_resolve():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local, "the README links into docs/"
    assert [link for link in local if not (REPO / link).exists()] == []
