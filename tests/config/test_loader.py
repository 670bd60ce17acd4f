import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from heavyranker.cli import main
from heavyranker.config import ConfigError, load_config
from heavyranker.config.data import DataConfig, DownsampleNegatives
from heavyranker.config.model import ZScoreLogConfig
from heavyranker.config.serving import PUBLISHED_ENGAGEMENT_WEIGHTS
from tests.conftest import CONFIGS, REFERENCE_YAML

FAV = "recap.engagement.is_favorited"


def problems(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.lines()


def warnings(caplog, path, overrides=()) -> list[str]:
    """The warnings load_config logs, each without the file's name."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="heavyranker.config"):
        load_config(path, list(overrides))
    return [r.getMessage().removeprefix(f"{path}: ") for r in caplog.records]


def write(tmp_path: Path, data: dict, name: str = "c.yaml") -> Path:
    shutil.copy(CONFIGS / "segdense_small.json", tmp_path / "segdense_small.json")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def small() -> dict:
    return yaml.safe_load((CONFIGS / "local_small.yaml").read_text())


def test_reference_yaml_loads_unchanged_with_tml_base(tmp_path, monkeypatch):
    schema_dir = tmp_path / "projects/home/recap/config/home_recap_2022"
    schema_dir.mkdir(parents=True)
    shutil.copy(CONFIGS / "segdense.json", schema_dir / "segdense.json")  # the reference schema, verbatim
    monkeypatch.setenv("TML_BASE", str(tmp_path))
    monkeypatch.setenv("HOME", "/home/someone")
    config = load_config(REFERENCE_YAML)
    assert len(config.model.tasks) == 10 and len(config.train_data.tasks) == 13
    assert config.training.save_dir == "/home/someone/tmp/runs/recap_local_debug"
    assert config.train_data.seg_dense_schema.schema_path == str(schema_dir / "segdense.json")
    # merge keys: the split overrides one task's rates and inherits the other twelve
    split = config.validation_data[FAV]
    assert split.tasks[FAV].neg_downsampling_rate == 0.01 and len(split.tasks) == 13
    assert split.tasks["recap.engagement.is_replied"].neg_downsampling_rate == 1.0
    assert config.engagement_weights == PUBLISHED_ENGAGEMENT_WEIGHTS


@pytest.mark.parametrize("name", ["local_prod.yaml", "local_small.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert config.task_names == list(config.model.tasks)


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch, small):
    path = write(tmp_path, small)
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.train_data.seg_dense_schema.schema_path == str(tmp_path / "segdense_small.json")
    assert config.train_data.inputs == str(tmp_path.parent / "data/local_small/train/*.gz")
    assert config.training.save_dir == str(tmp_path.parent / "runs/local_small")


def test_set_reaches_a_dotted_task_name(small_config_path):
    config = load_config(
        small_config_path, [f"model.tasks.{FAV}.pos_weight=2.5", "training.num_train_steps=7"]
    )
    assert config.model.tasks[FAV].pos_weight == 2.5
    assert config.training.num_train_steps == 7


def test_set_changes_one_place_even_through_a_yaml_alias(small_config_path):
    config = load_config(small_config_path, [f"train_data.tasks.{FAV}.neg_downsampling_rate=0.5"])
    assert config.train_data.tasks[FAV].neg_downsampling_rate == 0.5
    assert config.validation_data["validation"].tasks[FAV].neg_downsampling_rate == 1.0


def test_set_value_is_yaml(small_config_path):
    config = load_config(small_config_path, ["model.stratifiers=[{name: s, index: 1, value: 3}]"])
    assert config.model.stratifiers[0].index == 1


def test_unknown_key_at_depth_names_path_and_suggests(tmp_path, small):
    small["model"]["backbone"]["mask_net_config"]["mask_blocks"][0]["output_sise"] = 3
    [line] = problems(write(tmp_path, small))
    assert "model.backbone.mask_net_config.mask_blocks[0].output_sise: unknown field" in line
    assert "did you mean output_size?" in line


def test_two_members_of_a_one_of(tmp_path, small):
    small["model"]["tasks"][FAV]["dcn_config"] = {"poly_degree": 2}
    [line] = problems(write(tmp_path, small))
    assert f"model.tasks.{FAV}: exactly one of mlp_config, dcn_config, dlrm_config, mask_net_config" in line
    assert "got: mlp_config, dcn_config" in line


def test_none_of_a_required_one_of(tmp_path, small):
    del small["train_data"]["inputs"]
    [line] = problems(write(tmp_path, small))
    assert "train_data: exactly one of inputs, explicit_date_inputs, explicit_datetime_inputs" in line
    assert "got: none" in line


def test_share_none_with_backbone(tmp_path, small):
    small["model"]["multi_task_type"] = "share_none"
    [line] = problems(write(tmp_path, small))
    assert "model: multi_task_type share_none cannot have a backbone" in line


def test_share_all_without_backbone(tmp_path, small):
    del small["model"]["backbone"]
    [line] = problems(write(tmp_path, small))
    assert "model: multi_task_type share_all needs a backbone" in line


def test_tower_lr_for_unknown_task_and_missing_task(tmp_path, small):
    lrs = small["optimizer"]["multi_task_learning_rates"]["tower_learning_rates"]
    lrs["recap.engagement.is_nothing"] = lrs.pop(FAV)
    lines = problems(write(tmp_path, small))
    assert any(f"tower_learning_rates: no learning rate for task {FAV}" in line for line in lines)
    assert any(
        "tower_learning_rates.recap.engagement.is_nothing: not a task of model.tasks" in line
        for line in lines
    )


def test_model_task_without_label(tmp_path, small):
    del small["train_data"]["tasks"][FAV]
    lines = problems(write(tmp_path, small))
    assert any(f"model.tasks.{FAV}: no label of that name in train_data.tasks" in line for line in lines)


def test_sharded_tables_take_their_own_optimizer():
    # Was refused ("the tables' own optimizer is not offered with training.embedding_sharding: torchrec"):
    # sharded tables now train with optimizer.embedding's optimizer (tests/train/test_sharded_table_optim.py).
    path = CONFIGS / "local_small_ids.yaml"
    config = load_config(path, ["training.embedding_sharding=torchrec"])
    assert config.optimizer.embedding is not None and config.training.embedding_sharding == "torchrec"


def test_evaluation_task_not_in_split(tmp_path, small):
    small["validation_data"]["validation"]["evaluation_tasks"] = ["recap.engagement.is_nothing"]
    [line] = problems(write(tmp_path, small))
    assert (
        "validation_data.validation.evaluation_tasks: recap.engagement.is_nothing is not in this split"
        in line
    )


@pytest.mark.parametrize(
    ("keep_best", "expected"),
    [
        ({"split": "train"}, "training.keep_best.split: train is not a validation split (there are: "),
        (
            {"split": "validation", "task": "recap.engagement.is_nothing"},
            "training.keep_best.task: recap.engagement.is_nothing is not a model task evaluated on",
        ),
        ({"split": "validation", "metric": "loss"}, "training.keep_best.metric: "),
    ],
)
def test_keep_best_names_a_validation_split_a_model_task_and_a_metric(tmp_path, small, keep_best, expected):
    small["training"]["keep_best"] = keep_best
    [line] = problems(write(tmp_path, small))
    assert expected in line


def test_keep_best_takes_the_mean_over_tasks_by_default(small_config_path):
    config = load_config(small_config_path, ["training.keep_best={split: validation_downsampled}"])
    assert (config.training.keep_best.task, config.training.keep_best.metric) == ("mean", "rce")


def test_engagement_weight_for_unknown_task(tmp_path, small):
    small["serving"] = {"engagement_weights": {"recap.engagement.is_bookmarked": 2.0}}
    [line] = problems(write(tmp_path, small))
    assert "serving.engagement_weights.recap.engagement.is_bookmarked: not a task of model.tasks" in line


def test_wrong_type_names_field_and_value(tmp_path, small):
    small["training"]["num_train_steps"] = "many"
    [line] = problems(write(tmp_path, small))
    assert "training.num_train_steps: Input should be a valid integer" in line and "'many'" in line


def test_missing_schema_file(tmp_path, small):
    path = write(tmp_path, small)
    (tmp_path / "segdense_small.json").unlink()
    lines = problems(path)
    assert (
        f"train_data.seg_dense_schema.schema_path: file not found: {tmp_path / 'segdense_small.json'}"
        in lines[0]
    )


def test_unset_env_var_names_it_and_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HEAVYRANKER_NOPE", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  save_dir: ${HEAVYRANKER_NOPE}/runs\n")
    [line] = problems(path)
    assert line == f"{path}: line 2: environment variable HEAVYRANKER_NOPE is not set"


def test_env_var_becomes_a_number(tmp_path, monkeypatch, small):
    monkeypatch.setenv("STEPS", "42")
    small["training"]["num_train_steps"] = "STEPS_HERE"
    text = yaml.safe_dump(small).replace("STEPS_HERE", "${STEPS}")
    path = write(tmp_path, small)
    path.write_text(text)
    assert load_config(path).training.num_train_steps == 42


def test_piecewise_lists_must_fit(small_config_path):
    lines = problems(
        small_config_path,
        [
            "optimizer.multi_task_learning_rates.backbone_learning_rate="
            "{piecewise_constant: {learning_rate_boundaries: [10, 20], learning_rate_values: [1.0, 0.1]}}"
        ],
    )
    assert "backbone_learning_rate.piecewise_constant: learning_rate_values needs one more entry" in lines[0]


def test_cli_validate_prints_resolved_yaml_and_exits_0(small_config_path, capsys):
    assert main(["config", "validate", str(small_config_path)]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (
        resolved["training"]["checkpoint_every_n"]
        == yaml.safe_load(small_config_path.read_text())["training"]["checkpoint_every_n"]
    )
    assert resolved["training"]["gradient_accumulation"] is None  # a default, filled in
    assert resolved["serving"]["engagement_weights"][FAV] == 0.5


def test_cli_invalid_config_exits_2_one_line_per_problem_no_traceback(tmp_path, small):
    small["training"]["bogus"] = 1
    small["training"]["num_train_steps"] = -3
    path = write(tmp_path, small)
    result = subprocess.run(
        [sys.executable, "-m", "heavyranker", "config", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{path}: training.") for line in lines)
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["config", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the config" in capsys.readouterr().err


BACKBONE_COSINE = "optimizer.multi_task_learning_rates.backbone_learning_rate.linear_ramp_to_cosine"


def test_the_shipped_small_config_loads_without_warnings(caplog, small_config_path):
    assert warnings(caplog, small_config_path) == []


def test_a_shorter_run_warns_once_for_every_schedule_it_cuts_short(caplog, small_config_path):
    # local_small: eleven cosine schedules (the backbone's and ten towers') end at step 3000
    assert warnings(caplog, small_config_path, ["training.num_train_steps=50"]) == [
        f"{BACKBONE_COSINE}.final_num_steps: the cosine ends at step 3000 but training.num_train_steps is "
        "50: training stops before the rate reaches final_learning_rate (the same in 10 more schedules)"
    ]


def test_a_schedule_that_ends_early_is_named_on_its_own(caplog, small_config_path):
    tower = f"optimizer.multi_task_learning_rates.tower_learning_rates.{FAV}.linear_ramp_to_cosine"
    assert warnings(caplog, small_config_path, [f"{tower}.final_num_steps=2000"]) == [
        f"{tower}.final_num_steps: the cosine ends at step 2000 but training.num_train_steps is 3000: "
        "the last 1000 steps run at final_learning_rate"
    ]


@pytest.mark.parametrize("steps, warned", [(20, True), (21, False)])
def test_a_piecewise_schedule_whose_last_rate_is_never_used(caplog, tmp_path, small, steps, warned):
    # boundaries [10, 20]: steps 0-9 at 1.0, 10-19 at 0.1, 20 on at 0.01; a run of 20 steps ends at step 19
    piecewise = {"learning_rate_boundaries": [10, 20], "learning_rate_values": [1.0, 0.1, 0.01]}
    small["optimizer"] = {"single_task_learning_rate": {"piecewise_constant": piecewise}}
    small["training"]["num_train_steps"] = steps
    expected = [
        "optimizer.single_task_learning_rate.piecewise_constant.learning_rate_boundaries: the last "
        "boundary, 20, is not reached in training.num_train_steps (20) steps: the last of "
        "learning_rate_values is never used"
    ]
    assert warnings(caplog, write(tmp_path, small)) == (expected if warned else [])


def test_fields_without_effect_say_so():
    for model, field in [
        (DownsampleNegatives, "num_engagements"),
        (ZScoreLogConfig, "schema_path"),
        (DataConfig, "dataset_service_compression"),
    ]:
        description = model.model_fields[field].description
        assert description == "accepted for compatibility with the reference; has no effect"


def test_setting_a_field_without_effect_warns_with_its_path(caplog, tmp_path, small):
    small["model"]["featurization_config"] = {
        "z_score_log_config": {"analysis_path": "stats.json", "schema_path": "segdense_small.json"}
    }
    small["train_data"]["preprocess"] = {
        "downsample_negatives": {"batch_multiplier": 2, "engagements_list": [FAV], "num_engagements": 1}
    }
    small["validation_data"]["validation"]["dataset_service_compression"] = "AUTO"
    small["validation_data"]["validation_downsampled"]["dataset_service_compression"] = None  # not set
    no_effect = "accepted for compatibility with the reference; has no effect"
    assert sorted(warnings(caplog, write(tmp_path, small))) == [
        f"model.featurization_config.z_score_log_config.schema_path: {no_effect}",
        f"train_data.preprocess.downsample_negatives.num_engagements: {no_effect}",
        f"validation_data.validation.dataset_service_compression: {no_effect}",
    ]


# --- YAML that would take a command down: refused while the nodes are composed, each naming its line ---


def test_billion_laughs_is_refused_at_the_alias_that_crosses_a_million_nodes(tmp_path):
    # lolK is a list of ten aliases of lol(K-1): 10**9 strings at lol9, in 567 bytes.
    lines = ['lol0: &a0 ["lol"]']
    lines += [f"lol{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]" for k in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    # Expanded, lolK holds n_K = 1 + 10 n_(K-1) nodes (n_0 = 2): lines 1-6 with their keys and the root
    # make 234,584 nodes, and line 7 (lol6) adds 2 + 211,111 per alias: the 4th alias crosses 1,000,000.
    assert problems(path) == [f"{path}: line 7: more than 1,000,000 nodes once aliases are expanded"]


LONG_INT = (
    "is not a valid int: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits"
)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("a: &a [*a]\n", 1, "the alias *a is inside the node it names"),
        ("a: &a\n  b: [1, *a]\n", 2, "the alias *a is inside the node it names"),
        ("a: " + "[" * 100_000 + "\n", 1, "nested more than 64 levels deep"),
        # 40 levels under an anchor, used 30 levels down: 71 levels once expanded
        (
            "a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*a" + "]" * 30 + "\n",
            2,
            "nested more than 64",
        ),
        ("training:\n  seed: " + "7" * 5000 + "\n", 2, LONG_INT),
        ("a: 2023-13-01\n", 1, "'2023-13-01' is not a valid timestamp: month must be in 1..12"),
        ("a: !!int abc\n", 1, "'abc' is not a valid int: invalid literal for int() with base 10: 'abc'"),
        (
            "training:\n  num_train_steps: 5\n  num_train_steps: 7\n",
            3,
            "num_train_steps is given twice in this mapping (first on line 2)",
        ),
        ("a: [1, 2\nb: 3\n", 2, "not valid YAML: while parsing a flow sequence; expected ',' or ']'"),
    ],
    ids=[
        "self-alias",
        "self-alias-in-map",
        "deep",
        "deep-via-alias",
        "long-int",
        "date",
        "tag",
        "twice",
        "syntax",
    ],
)
def test_hostile_yaml_is_one_line_naming_the_line(tmp_path, text, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    [got] = problems(path)
    assert got.startswith(f"{path}: line {line}: ") and message in got


@pytest.mark.parametrize(
    "lists, first", [(63, "a: unknown field"), (64, "line 1: nested more than 64 levels")]
)
def test_nesting_is_refused_past_64_levels(tmp_path, lists, first):
    path = tmp_path / "c.yaml"
    path.write_text("a: " + "[" * lists + "]" * lists + "\n")  # the top mapping, then the lists
    assert any(line.startswith(f"{path}: {first}") for line in problems(path))


def test_an_env_var_cannot_smuggle_in_a_long_integer(tmp_path, monkeypatch):
    monkeypatch.setenv("SEED", "7" * 5000)
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  seed: ${SEED}\n")
    [line] = problems(path)
    assert line.startswith(f"{path}: line 2: '7777") and line.endswith(LONG_INT)


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"training:\n  seed: \xff\n")
    assert problems(path) == [f"{path}: not UTF-8 text: invalid start byte at byte 18"]


def test_a_merge_key_may_still_override_what_it_merges(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert "twice" not in " ".join(problems(path))


@pytest.mark.parametrize(
    "value, message",
    [
        ("[" * 100, "nested more than 64 levels deep"),
        ("{a: 1, a: 2}", "a is given twice in this mapping (first on line 1)"),
        ("7" * 5000, LONG_INT),
        ("[1, 2", "not valid YAML: while parsing a flow sequence; expected ',' or ']'"),
    ],
    ids=["deep", "twice", "long-int", "syntax"],
)
def test_set_values_go_through_the_same_yaml_checks(small_config_path, value, message):
    [line] = problems(small_config_path, [f"training.seed={value}"])
    assert line.startswith(f"{small_config_path}: --set: 'training.seed=")
    assert message in line


def test_a_set_path_deeper_than_a_yaml_may_nest_is_one_line(small_config_path):
    # 60,000 segments took minutes: each level looked for the longest run of segments naming a key.
    path = "training." + "a." * 60_000 + "b"
    expected = "--set: training.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a...: a path of more than 64 segments"
    assert problems(small_config_path, [f"{path}=1"]) == [f"{small_config_path}: {expected}"]
    # 64 segments are still set, and validated as any value is.
    [problem] = problems(small_config_path, ["training." + "a." * 62 + "b=1"])
    assert problem.startswith(f"{small_config_path}: training.a: unknown field")


def test_a_file_past_16_mb_is_refused_before_it_is_parsed(tmp_path):
    # /dev/zero, or a stream that never ends, was read until memory ran out; a regular file stands for them.
    path = tmp_path / "c.yaml"
    path.write_bytes(b"#" * (16 * 2**20 + 1))
    assert problems(path) == [f"{path}: more than 16 MB: not the config"]


def test_a_config_error_is_a_user_error(tmp_path):
    """Code that catches a person's mistakes (UserError) catches a bad config too."""
    from heavyranker.errors import UserError

    with pytest.raises(UserError):
        load_config(tmp_path / "absent.yaml")


def test_the_schema_and_dates_are_resolved_as_the_config_loads(tmp_path, small):
    """Consumers take the schema object and the parsed dates the loader resolved: the schema file is read
    once, while the config is checked, and is not needed after."""
    from datetime import datetime

    import torch

    from heavyranker.data.columns import feature_specs
    from heavyranker.schema import FeatureSpec

    del small["train_data"]["inputs"]
    hours = {"data_root": "data", "end_datetime": "2023/01/31/05", "hours": 2}
    small["train_data"]["explicit_datetime_inputs"] = hours
    config = load_config(write(tmp_path, small))
    (tmp_path / "segdense_small.json").unlink()

    assert config.train_data.explicit_datetime_inputs.end == datetime(2023, 1, 31, 5)
    cont = "home_recap_2022_cont__segdense_vals"
    assert config.train_data.seg_dense_schema.specs[cont] == FeatureSpec(cont, "float_list", 48)
    assert feature_specs(config.train_data)["binary"].dtype == torch.float32  # flags, as the model reads them


def test_keep_best_on_a_split_that_ends_at_latest_warns(caplog, small_config_path, tmp_path):
    dated = f"{{data_root: {tmp_path}, end_datetime: latest, hours: 2}}"
    overrides = ["validation_data.validation.inputs=null"]
    overrides += [f"validation_data.validation.explicit_datetime_inputs={dated}"]
    overrides += ["training.keep_best={split: validation, metric: rce}"]
    assert warnings(caplog, small_config_path, overrides) == [
        "training.keep_best.split: validation ends at latest, so each evaluation reads other (the newest) "
        "examples and the best is chosen among figures of different data; keep a split with a fixed end "
        "for it"
    ]
