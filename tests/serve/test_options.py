"""serve's options: one model (config.serving.ServeOptions) gives every default, each option is a flag of
`serve` and a field of the YAML's `serving:` section, which serve reads from the model folder's manifest
(export writes the config there). Precedence: flag > the folder's `serving:` > default. A bad value is an
error naming the setting, and the CLI names the flag when a flag gave it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from heavyranker.cli import build_parser, main
from heavyranker.config.serving import ServeOptions, ServingConfig, serve_options
from heavyranker.errors import SettingError
from heavyranker.handlers import serve_flags_given
from heavyranker.serve.app import create_app
from heavyranker.serve.scorer import MANIFEST
from tests.conftest import CONFIGS
from tests.serve.conftest import Exported, serving

# Each option's flag, written out: the CLI derives them from the fields, this is what users type.
FLAGS = {
    "host": "--host",
    "port": "--port",
    "model_name": "--model-name",
    "max_candidates": "--max-candidates",
    "max_queue": "--max-queue",
    "read_timeout": "--read-timeout",
    "max_batch": "--max-batch",
    "batch_wait_ms": "--batch-wait-ms",
    "repository": "--repository",
    "poll_seconds": "--poll-seconds",
    "pin_version": "--pin-version",
}


def folder_with_serving(exported: Exported, tmp_path: Path, **serving: object) -> Path:
    """A copy of the exported folder whose config's `serving:` section sets `serving`, as an export of a
    YAML with that section writes it."""
    folder = tmp_path / "model"
    shutil.copytree(exported.folder, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["config"]["serving"].update(serving)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_every_option_is_a_flag_of_serve_with_its_description():
    assert list(ServeOptions.model_fields) == list(FLAGS)
    parser = build_parser()
    serve = parser.parse_args(["serve", "--model", "m"]).parser
    helps = {flag: action.help for action in serve._actions for flag in action.option_strings}
    for name, flag in FLAGS.items():
        description = ServeOptions.model_fields[name].description
        assert description and helps[flag].startswith(description)
    # Not given, a flag leaves the option to the model folder's config, then to the default.
    assert serve_flags_given(parser.parse_args(["serve", "--model", "m"])) == {}
    given = parser.parse_args(["serve", "--model", "m", "--read-timeout", "2.5", "--max-queue", "0"])
    assert serve_flags_given(given) == {"read_timeout": 2.5, "max_queue": 0}


def test_the_serving_section_holds_the_options_beside_the_weights():
    assert set(ServingConfig.model_fields) == {*FLAGS, "engagement_weights"}
    assert all(field.description for field in ServingConfig.model_fields.values())


def test_the_defaults():
    assert ServeOptions().model_dump() == {
        "host": "127.0.0.1",
        "port": 8000,
        "model_name": "heavyranker",
        "max_candidates": 2048,
        "max_queue": 8,
        "read_timeout": 10.0,
        "max_batch": 2048,
        "batch_wait_ms": 2.0,
        "repository": None,
        "poll_seconds": 2.0,
        "pin_version": None,
    }


def test_a_flag_wins_over_the_section_which_wins_over_the_default():
    section = {"max_queue": 3, "max_batch": 16, "engagement_weights": {"a": 1.0}}
    options = serve_options(section, {"max_batch": 4}, "m/manifest.json")
    assert (options.max_queue, options.max_batch, options.read_timeout) == (3, 4, 10.0)
    # A flag also replaces a bad value of the section: it is never used.
    assert serve_options({"max_queue": -1}, {"max_queue": 2}, "m/manifest.json").max_queue == 2


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("max_candidates", 0, "should be greater than or equal to 1 (got 0)"),
        ("max_queue", -1, "should be greater than or equal to 0 (got -1)"),
        ("read_timeout", 0.0, "should be greater than 0 (got 0.0)"),
        ("max_batch", 0, "should be greater than or equal to 1 (got 0)"),
        ("batch_wait_ms", -1.0, "should be greater than or equal to 0 (got -1.0)"),
        ("port", 65536, "should be less than or equal to 65535 (got 65536)"),
        ("max_queue", 2.0, "should be a valid integer (got 2.0)"),
        ("read_timeout", float("nan"), "should be a finite number (got nan)"),
    ],
)
def test_a_bad_value_names_the_setting_and_where_it_came_from(name: str, value: object, problem: str):
    with pytest.raises(SettingError) as given:
        serve_options({}, {name: value}, "m/manifest.json")
    assert str(given.value) == f"serving.{name} {problem}"
    with pytest.raises(SettingError) as from_section:
        serve_options({name: value}, {}, "m/manifest.json")
    assert str(from_section.value) == f"m/manifest.json: serving.{name} {problem}"


def test_an_unknown_option_is_refused():
    with pytest.raises(SettingError, match=r"^serving\.max_candidate is not an option of serve$"):
        serve_options({}, {"max_candidate": 5}, "m/manifest.json")


def test_export_writes_the_serving_section_where_serve_reads_it(exported: Exported):
    manifest = json.loads((exported.folder / MANIFEST).read_text())
    assert manifest["config"]["serving"] == exported.config.serving.model_dump(mode="json")
    assert ServeOptions.model_fields.keys() <= manifest["config"]["serving"].keys()


def test_the_app_takes_the_folders_section_under_its_overrides(exported: Exported, tmp_path: Path):
    folder = folder_with_serving(exported, tmp_path, max_candidates=5, model_name="from-yaml", max_queue=3)
    assert create_app(exported.folder).state.options == ServeOptions()
    app = create_app(folder, max_queue=1)
    options = app.state.options
    assert (options.max_candidates, options.model_name, options.max_queue) == (5, "from-yaml", 1)
    assert app.state.limits.max_queue == 1
    inputs = app.state.versions.current.scorer.inputs
    candidate = {"id": 1, "features": {spec.name: [0.5] * spec.width for spec in inputs}}
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/rank", json={"candidates": [candidate] * 6}, timeout=60)
        assert response.status_code == 413
        assert response.json() == {"detail": "candidates: 6 of them, at most 5 per request"}
        assert httpx.get(f"{url}/v2/models/from-yaml/ready", timeout=60).status_code == 200


def test_the_cli_names_the_flag_that_gave_a_bad_value(exported: Exported, tmp_path: Path, capsys):
    assert main(["serve", "--model", str(exported.folder), "--max-queue", "-1"]) == 2
    assert capsys.readouterr().err == "error: --max-queue should be greater than or equal to 0 (got -1)\n"
    folder = folder_with_serving(exported, tmp_path, batch_wait_ms=-2)
    assert main(["serve", "--model", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"error: {folder / MANIFEST}: serving.batch_wait_ms should be greater than or equal to 0 (got -2)\n"
    )


def test_the_cli_names_the_flag_of_a_library_setting(tmp_path: Path, capsys):
    config = str(CONFIGS / "local_small.yaml")
    assert main(["data", "dump", "--config", config, "--batches", "0", "--out", str(tmp_path / "d.npz")]) == 2
    assert capsys.readouterr().err == "error: --batches must be at least 1, got 0\n"
