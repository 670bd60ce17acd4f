"""The search space: errors that name the path, wildcards, and the objective's arithmetic."""

from __future__ import annotations

import math

import pytest
import yaml

from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.errors import UserError
from heavyranker.tune.space import Objective, expand, read_space
from tests.conftest import CONFIGS, REPO, SMALL_SPLITS

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


LAUGHS = "".join(f"l{k}: &a{k} [{', '.join([f'*a{k - 1}'] * 10)}]\n" for k in range(1, 9))


@pytest.mark.parametrize(
    "text, line",
    [
        (
            "objective: {split: validation}\nparams:\n  training.seed: {low: 1, high: 3}\n"
            "  training.seed: {choices: [5]}\n",
            "space.yaml: line 4: training.seed is given twice in this mapping (first on line 3)",
        ),
        (
            "objective: {split: validation}\nparams: {training.seed: {choices: [\xff]}}\n",
            "space.yaml: not UTF-8 text: invalid start byte at byte 66",
        ),
        (  # 10 choices of 10**7 strings each: their labels would be dumped for ever
            "l0: &a0 [x]\n"
            + LAUGHS
            + "objective: {split: validation}\nparams: {training.seed: {choices: *a8}}\n",
            "space.yaml: line 7: more than 1,000,000 nodes once aliases are expanded",
        ),
    ],
    ids=["twice", "not-utf8", "alias-bomb"],
)
def test_the_space_file_is_read_as_a_config_is(tmp_path, small_data, capsys, text, line):
    (tmp_path / "space.yaml").write_bytes(text.encode("latin-1"))
    args = ["tune", "--config", str(CONFIG), "--space", str(tmp_path / "space.yaml"), "--trials", "1"]
    args += ["--out", str(tmp_path / "out"), *(a for o in data_overrides(small_data) for a in ("--set", o))]
    assert main(args) == 2
    assert capsys.readouterr().err == f"{tmp_path}/{line}\n"
    assert not (tmp_path / "out").exists()  # refused before the study is created


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


EXPERT = {"mlp_config": {"layer_sizes": [16], "final_layer_activation": True}}
MMOE = {"multi_task_type": "mmoe", "backbone": None, "experts": {"num_experts": 2, "expert": EXPERT}}
PLE = {
    "multi_task_type": "ple",
    "backbone": None,
    "experts": {"num_experts": 1, "num_shared_experts": 1, "expert": EXPERT},
}
DCN = {"backbone": {"dcn_config": {"poly_degree": 2}}}  # replaces the backbone whole: no mask_net_config left
NARROW = {"backbone.mask_net_config.mlp.layer_sizes": [32]}  # a dotted key: the rest of the backbone stays


def test_a_mapping_choice_sets_the_fields_it_names_and_keeps_the_others(tmp_path, small_data):
    space = read_space(
        write_space(tmp_path, {"model": {"choices": [MMOE, PLE, DCN, NARROW]}}),
        CONFIG,
        data_overrides(small_data),
    )
    (param,) = space.params
    labels = param.distribution.choices
    assert labels[2] == "{backbone: {dcn_config: {poly_degree: 2}}}"  # what Optuna stores: the YAML
    assert space.config_values({"model": labels[0]}) == {
        "model.multi_task_type": "mmoe",
        "model.backbone": None,
        "model.experts": {"num_experts": 2, "expert": EXPERT},
    }
    assert space.config_values({"model": labels[3]}) == {
        "model.backbone.mask_net_config.mlp.layer_sizes": [32]
    }

    base = load_config(CONFIG, data_overrides(small_data))
    models = [
        load_config(CONFIG, data_overrides(small_data), space.config_values({"model": label})).model
        for label in labels
    ]
    mmoe, ple, dcn, narrow = models
    assert (mmoe.multi_task_type, mmoe.backbone, mmoe.experts.num_experts) == ("mmoe", None, 2)
    assert (mmoe.experts.num_shared_experts, mmoe.experts.num_levels) == (0, 1)  # the defaults
    assert (ple.multi_task_type, ple.backbone, ple.experts.num_shared_experts) == ("ple", None, 1)
    assert ple.experts.expert.mlp_config.layer_sizes == [16]
    assert dcn.multi_task_type == "share_all" and dcn.backbone.mask_net_config is None
    assert (dcn.backbone.dcn_config.poly_degree, dcn.backbone.dcn_config.use_parallel) == (2, True)
    # local_small's backbone: two mask blocks of 128 -> 64, in parallel, then an MLP now 32 wide
    blocks = narrow.backbone.mask_net_config.mask_blocks
    assert [(b.aggregation_size, b.output_size) for b in blocks] == [(128, 64), (128, 64)]
    assert narrow.backbone.mask_net_config.mlp.layer_sizes == [32]
    assert narrow.backbone.mask_net_config.use_parallel is True
    for model in models:  # the fields no choice names keep the config's values
        assert model.tasks == base.model.tasks
        assert model.featurization_config == base.model.featurization_config


@pytest.mark.parametrize(
    "choices, named",
    [
        (
            [MMOE, {"multi_task_type": "mmoe", "backbone": None}],
            "params.model.choices[1]: it does not fit the config: model: model.experts is for multi_task",
        ),
        (
            [{"multi_task_typo": "ple"}],
            "params.model.choices[0]: it does not fit the config: model.multi_task_typo",
        ),
        (
            [MMOE, {**PLE, "experts": {**PLE["experts"], "num_shared_experts": 0}}],
            "params.model.choices[1]: it",
        ),
        (
            [{"backbone": None, "backbone.dcn_config": {}}],
            "params.model.choices[0]: backbone.dcn_config lies inside",
        ),
        ([{1: "mmoe"}], "params.model.choices[0]: 1: a mapping choice's keys are fields"),
    ],
)
def test_a_mapping_choice_that_does_not_fit_is_one_line_naming_its_index(
    tmp_path, small_data, choices, named
):
    with pytest.raises(UserError) as error:
        read_space(write_space(tmp_path, {"model": {"choices": choices}}), CONFIG, data_overrides(small_data))
    assert str(error.value).startswith(f"{tmp_path / 'space.yaml'}: {named}")
    assert "\n" not in str(error.value)


def test_a_param_inside_a_mapping_choice_is_refused(tmp_path, small_data):
    sharing = {"choices": [{"multi_task_type": "share_all"}, {"multi_task_type": "share_partial"}]}
    params = {"model": sharing, "model.multi_task_type": {"choices": ["share_all"]}}
    with pytest.raises(UserError) as error:
        read_space(write_space(tmp_path, params), CONFIG, data_overrides(small_data))
    assert str(error.value) == (
        f"{tmp_path / 'space.yaml'}: params.model and params.model.multi_task_type both set "
        "model.multi_task_type; vary it in one of them (a mapping choice can set it with the other fields)"
    )
    wider = {"model": {"choices": [{}, {"backbone": {"mlp_config": {"layer_sizes": [8]}}}]}}
    params = {**wider, "model.backbone.mask_net_config.mlp.layer_sizes": {"choices": [[64]]}}
    with pytest.raises(UserError, match="both set model.backbone;"):
        read_space(write_space(tmp_path, params), CONFIG, data_overrides(small_data))
    # a field the mapping choices never name may be varied beside them
    space = read_space(
        write_space(
            tmp_path, {"model": sharing, "model.tasks.*.mlp_config.layer_sizes": {"choices": [[8, 1]]}}
        ),
        CONFIG,
        data_overrides(small_data),
    )
    assert [p.path for p in space.params] == ["model", "model.tasks.*.mlp_config.layer_sizes"]


def test_the_protocol_space_draws_mmoe_and_ple_with_their_experts(tmp_path, small_data):
    space = read_space(REPO / "bench/protocol/space.yaml", CONFIG, data_overrides(small_data))
    (model,) = [p for p in space.params if p.path == "model"]
    kinds = {}
    for label in model.distribution.choices:
        config = load_config(CONFIG, data_overrides(small_data), space.config_values({"model": label}))
        kinds[config.model.multi_task_type.value] = config.model
    assert sorted(kinds) == ["mmoe", "ple", "share_all", "share_partial"]
    assert kinds["mmoe"].backbone is None and kinds["mmoe"].experts.num_experts == 4
    assert kinds["ple"].backbone is None and kinds["ple"].experts.num_shared_experts == 2
    assert kinds["share_partial"].backbone == kinds["share_all"].backbone is not None
