"""MMoE and PLE (model/experts.py): the config's rules, the experts and gates each level holds, gate weights
and mixes against closed forms, and the ranker's towers reading each task's own mix."""

import math

import pytest
import torch
from torch import nn

from heavyranker.config import load_config
from heavyranker.config.loader import ConfigError
from heavyranker.data.columns import feature_specs
from heavyranker.errors import UserError
from heavyranker.model import build_model, module_name
from heavyranker.model.experts import ExtractionLevel, Gate
from tests.model.test_ranker import SMALL_INPUT, TASKS, _features

EXPERT = "expert: {mlp_config: {layer_sizes: [24, 12], final_layer_activation: true}}"
MMOE = ["model.multi_task_type=mmoe", "model.backbone=null", f"model.experts={{num_experts: 3, {EXPERT}}}"]
PLE = [
    "model.multi_task_type=ple",
    "model.backbone=null",
    f"model.experts={{num_experts: 2, num_shared_experts: 3, num_levels: 2, {EXPERT}}}",
]


def _build(path, overrides):
    config = load_config(path, overrides)
    torch.manual_seed(0)
    return config, build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def _constant_gate(biases: list[float], in_features: int) -> Gate:
    """A gate whose weights are zero: softmax(biases) for every row."""
    gate = Gate(None, in_features, len(biases), "aten")
    gate.linear = _linear([[0.0] * in_features for _ in biases], biases)
    return gate


def _softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_gate_weights_are_a_softmax_of_the_linear_layer_and_sum_to_one():
    gate = Gate(None, 2, 3, "aten")
    gate.linear = _linear([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], [0.5, 0.0, -0.5])
    weights = gate(torch.tensor([[1.0, 2.0], [-3.0, 0.5]]))
    # logits by hand: row 1 [1.5, 4, 0.5], row 2 [-2.5, 1, 3]
    expected = [_softmax([1.5, 4.0, 0.5]), _softmax([-2.5, 1.0, 3.0])]
    torch.testing.assert_close(weights, torch.tensor(expected))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))


def test_a_ple_level_mixes_each_tasks_experts_with_the_shared_ones_by_its_gate():
    """Two tasks, one expert each, one shared expert, 1-wide linear experts on a 2-wide input: every output
    is written out by hand."""
    own = {"a": [_linear([[1.0, 0.0]], [0.0])], "b": [_linear([[0.0, 1.0]], [0.0])]}  # x0, x1
    shared = [_linear([[1.0, 1.0]], [1.0])]  # x0 + x1 + 1
    gates = {"a": _constant_gate([0.0, math.log(3.0)], 2), "b": _constant_gate([math.log(2.0), 0.0], 2)}
    shared_gate = _constant_gate([0.0, 0.0, math.log(2.0)], 2)
    level = ExtractionLevel(own, shared, gates, shared_gate)
    task_a, task_b, common = (
        torch.tensor([[2.0, 4.0]]),
        torch.tensor([[6.0, 8.0]]),
        torch.tensor([[1.0, -1.0]]),
    )
    (mix_a, mix_b), mix_shared = level([task_a, task_b], common)
    # task a: weights (1/4, 3/4) over (its expert on a = 2, shared on the shared input = 1 + -1 + 1 = 1)
    torch.testing.assert_close(mix_a, torch.tensor([[0.25 * 2.0 + 0.75 * 1.0]]))
    # task b: weights (2/3, 1/3) over (its expert on b = 8, shared = 1)
    torch.testing.assert_close(mix_b, torch.tensor([[2 / 3 * 8.0 + 1 / 3 * 1.0]]))
    # shared gate: weights (1/4, 1/4, 1/2) over (a's expert on a, b's expert on b, shared): 2, 8, 1
    torch.testing.assert_close(mix_shared, torch.tensor([[0.25 * 2.0 + 0.25 * 8.0 + 0.5 * 1.0]]))


def test_mmoe_is_one_level_of_shared_experts_with_a_gate_per_task(small_config_path):
    config, model = _build(small_config_path, MMOE)
    assert model.backbone is None and len(model.experts.levels) == 1
    level = model.experts.levels[0]
    assert len(level.shared_experts) == 3 and all(len(row) == 0 for row in level.task_experts.values())
    assert level.shared_gate is None and len(level.task_gates) == len(TASKS)
    assert level.shared_experts[0].layers[0].in_features == SMALL_INPUT
    assert all(
        gate.linear.in_features == SMALL_INPUT and gate.linear.out_features == 3
        for gate in level.task_gates.values()
    )
    assert all(tower.layers[0].in_features == 12 for tower in model.towers.values())
    out = model(_features(config), return_backbone=True)
    assert out["logits"].shape == (8, len(TASKS)) and out["backbone"].shape == (8, len(TASKS), 12)
    weights = level.task_gates[module_name(TASKS[4])](model.inputs(_features(config)))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(8))


def test_ple_levels_hold_task_and_shared_experts_and_the_last_has_no_shared_gate(small_config_path):
    config, model = _build(small_config_path, PLE)
    first, last = model.experts.levels
    for level, width in ((first, SMALL_INPUT), (last, 12)):
        assert [len(row) for row in level.task_experts.values()] == [2] * len(TASKS) and len(
            level.shared_experts
        ) == 3
        assert {gate.linear.out_features for gate in level.task_gates.values()} == {2 + 3}
        assert level.shared_experts[0].layers[0].in_features == width
    assert first.shared_gate.linear.out_features == 2 * len(TASKS) + 3 and last.shared_gate is None
    assert model(_features(config))["logits"].shape == (8, len(TASKS))


def test_each_tower_reads_its_own_tasks_mix(small_config_path):
    config, model = _build(small_config_path, MMOE)
    model.eval()
    features = _features(config)
    out = model(features, return_backbone=True)
    for i, task in enumerate(TASKS):
        tower = model.towers[module_name(task)]
        torch.testing.assert_close(out["logits"][:, i], tower(out["backbone"][:, i])[:, 0])
    # the gates differ per task (their own initial weights), so the mixes do too
    assert not torch.allclose(out["backbone"][:, 0], out["backbone"][:, 1])


def test_experts_and_gates_learn_at_the_backbones_rate(small_config_path):
    _, model = _build(small_config_path, PLE)
    towers = {id(p) for params in model.tower_parameters().values() for p in params}
    expert_params = [p for name, p in model.named_parameters() if name.startswith("experts.")]
    assert expert_params and not towers & {id(p) for p in expert_params}


def test_gate_mlp_puts_hidden_layers_before_the_softmax_layer(small_config_path):
    gate_mlp = "gate_mlp: {layer_sizes: [7], final_layer_activation: true}"
    config, model = _build(
        small_config_path, [*MMOE[:2], f"model.experts={{num_experts: 3, {gate_mlp}, {EXPERT}}}"]
    )
    gate = model.experts.levels[0].task_gates[module_name(TASKS[0])]
    assert gate.hidden.layers[0].in_features == SMALL_INPUT and gate.linear.in_features == 7
    weights = gate(model.inputs(_features(config)))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(8))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.multi_task_type=mmoe", "model.backbone=null"],
            "model.experts is for multi_task_type mmoe and ple",
        ),
        (
            [f"model.experts={{num_experts: 2, {EXPERT}}}"],
            r"model.experts is for .*got share_all, experts set",
        ),
        ([*MMOE[:1], MMOE[2]], "multi_task_type mmoe cannot have a backbone"),
        (
            [*MMOE[:2], f"model.experts={{num_experts: 2, num_shared_experts: 1, {EXPERT}}}"],
            "num_shared_experts and num_levels are for ple",
        ),
        ([*PLE[:2], f"model.experts={{num_experts: 2, {EXPERT}}}"], "ple needs num_shared_experts >= 1"),
        ([*MMOE[:2], "model.experts={num_experts: 2}"], r"model.experts.expert"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(small_config_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(small_config_path, overrides)
    assert "\n" not in str(error.value)


def test_an_experts_build_error_names_its_config_path(small_config_path):
    block = "{reduction_factor: 0.001, input_layer_norm: false, output_size: 8}"
    expert = f"expert: {{mask_net_config: {{mask_blocks: [{block}]}}}}"
    with pytest.raises(
        UserError, match=r"^model.experts.expert.mask_net_config.mask_blocks\[0\].reduction_factor"
    ):
        _build(small_config_path, [*MMOE[:2], f"model.experts={{num_experts: 2, {expert}}}"])
