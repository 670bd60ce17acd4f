"""The search space: errors that name the path, wildcards, and the objective's arithmetic."""

from __future__ import annotations

import math

import pytest
import yaml

from heavyranker.errors import UserError
from heavyranker.tune.space import Objective, expand, read_space
from tests.conftest import CONFIGS, SMALL_SPLITS

CONFIG = CONFIGS / "local_small.yaml"
TOWER_LR = "optimizer.multi_task_learning_rates.tower_learning_rates.*.linear_ramp_to_cosine.learning_rate"


def data_overrides(data_dir) -> list[str]:
    paths = [f"train_data.inputs={data_dir}/train/*.gz"]
    return paths + [f"validation_data.{s}.inputs={data_dir}/{s}/*.gz" for s in SMALL_SPLITS]


def write_space(tmp_path, params, objective=None):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"objective": objective or {"split": "validation"}, "params": params}))
    return path


@pytest.mark.parametrize(
    "params, named",
    [
        ({"model.no_such_field": {"low": 1, "high": 3}}, "params.model.no_such_field"),
        ({"training.num_train_steps": {"choices": ["many", "more"]}}, "params.training.num_train_steps"),
        ({"model.multi_task_type": {"low": 1, "high": 3}}, "params.model.multi_task_type"),
        ({"training.num_train_steps": {"low": 10, "hihg": 20}}, "params.training.num_train_steps"),
        ({"training.num_train_steps": {"low": 20, "high": 10}}, "params.training.num_train_steps"),
        ({}, "params: empty"),
    ],
)
def test_a_bad_space_is_one_line_naming_the_path(tmp_path, small_data, params, named):
    with pytest.raises(UserError) as error:
        read_space(write_space(tmp_path, params), CONFIG, data_overrides(small_data))
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_the_objective_split_may_not_be_a_training_split(tmp_path, small_data):
    overrides = [*data_overrides(small_data), f"validation_data.validation.inputs={small_data}/train/*.gz"]
    space = write_space(tmp_path, {"training.num_train_steps": {"low": 10, "high": 20}})
    with pytest.raises(UserError, match="objective.split: validation reads 4 file"):
        read_space(space, CONFIG, overrides)
    with pytest.raises(UserError, match="'train' is not a validation split"):
        read_space(
            write_space(tmp_path, {"training.seed": {"low": 0, "high": 9}}, {"split": "train"}),
            CONFIG,
            overrides,
        )


def test_a_wildcard_names_every_tower(tmp_path, small_data):
    space = read_space(
        write_space(tmp_path, {TOWER_LR: {"choices": [0.001, 0.01]}}), CONFIG, data_overrides(small_data)
    )
    targets = space.params[0].targets
    assert len(targets) == 10  # local_small's ten towers
    assert all(
        t.startswith("optimizer.multi_task_learning_rates.tower_learning_rates.recap.") for t in targets
    )
    assert space.config_values({TOWER_LR: 0.01}) == dict.fromkeys(targets, 0.01)


def test_expand_keeps_dotted_keys_whole():
    tree = {"a": {"x.y": {"b": 1}, "z": {"b": 2}}}
    assert expand("a.*.b", tree) == ["a.x.y.b", "a.z.b"]
    assert expand("a.x.y.b", tree) == ["a.x.y.b"]
    assert expand("a.*.c.*", tree) == ["a.x.y.c.*", "a.z.c.*"]  # left for the config's validation to name


def test_a_list_choice_comes_back_as_a_list(tmp_path, small_data):
    path = "model.backbone.mask_net_config.mlp.layer_sizes"
    space = read_space(
        write_space(tmp_path, {path: {"choices": [[128], [64, 32]]}}), CONFIG, data_overrides(small_data)
    )
    labels = space.params[0].distribution.choices
    assert labels == ("[128]", "[64, 32]")
    assert space.config_values({path: "[64, 32]"}) == {path: [64, 32]}


METRICS = {
    "a": {"rce": 10.0},
    "b": {"rce": 20.0},
    "c": {"rce": None},  # one class only in the split
    "a/stratum": {"rce": 99.0},
}


def test_the_objective_means_weights_and_leaves_undefined_tasks_out():
    weights = {"a": 1.0, "b": -3.0, "c": 5.0}
    assert Objective("v", "rce", "mean").value(METRICS, weights) == 15.0
    assert Objective("v", "rce", "weighted").value(METRICS, weights) == (10.0 + 3 * 20.0) / 4
    assert Objective("v", "rce", ("b",)).value(METRICS, weights) == 20.0
    assert math.isnan(Objective("v", "rce", ("c",)).value(METRICS, weights))
