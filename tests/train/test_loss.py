import math
from pathlib import Path

import pytest
import torch

from heavyranker.config import load_config
from heavyranker.data.batch import Batch
from heavyranker.train.loss import MultiTaskLoss, build_loss

SMALL = Path(__file__).resolve().parents[2] / "configs" / "local_small.yaml"


def bce(x: float, y: float, w: float, pos_weight: float) -> float:
    """-w * (pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))), written out."""
    p = 1.0 / (1.0 + math.exp(-x))
    return -w * (pos_weight * y * math.log(p) + (1.0 - y) * math.log(1.0 - p))


def test_loss_matches_a_hand_computation_with_weights_and_pos_weight():
    logits = [[0.5, -1.0], [2.0, 0.3], [-0.7, 1.5]]
    labels = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    weights = [[1.0, 2.0], [0.5, 1.0], [3.0, 0.25]]
    pos_weights = [2.0, 1.0]
    loss = MultiTaskLoss(["a", "b"], pos_weights)
    total, per_task = loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(weights))

    # Per task: sum_i w_i * l_i / B (the batch mean of the weighted losses); total: mean over tasks.
    expected = [
        sum(bce(logits[i][t], labels[i][t], weights[i][t], pos_weights[t]) for i in range(3)) / 3
        for t in range(2)
    ]
    assert per_task.tolist() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_mean_of_equal_micro_batches_is_the_loss_of_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=generator)
    labels = (torch.rand(8, 3, generator=generator) < 0.3).float()
    weights = torch.rand(8, 3, generator=generator) * 5
    loss = MultiTaskLoss(["a", "b", "c"], [1.0, 2.0, 0.5])
    whole, _ = loss(logits, labels, weights)
    halves = [loss(logits[i : i + 4], labels[i : i + 4], weights[i : i + 4])[0] for i in (0, 4)]
    assert whole.item() == pytest.approx((halves[0] + halves[1]).item() / 2, rel=1e-6)


def test_labels_are_matched_by_name_when_the_data_has_extra_tasks_in_another_order():
    tasks = ["a", "b"]
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.3]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    # The data holds b, an extra task x, then a.
    batch = Batch(
        {},
        torch.stack([labels[:, 1], torch.ones(2), labels[:, 0]], 1),
        torch.stack([weights[:, 1], torch.ones(2), weights[:, 0]], 1),
        ("b", "x", "a"),
    )
    columns = batch.columns(tasks)
    loss = MultiTaskLoss(tasks, [2.0, 1.0])
    by_name = loss(logits, batch.labels[:, columns], batch.weights[:, columns])
    direct = loss(logits, labels, weights)
    assert torch.equal(by_name[1], direct[1])


def test_build_loss_takes_pos_weight_per_task_in_model_order():
    config = load_config(SMALL, ["model.tasks.recap.engagement.is_replied.pos_weight=4.5"])
    loss = build_loss(config.model)
    assert loss.task_names == config.task_names
    expected = [4.5 if t == "recap.engagement.is_replied" else 1.0 for t in config.task_names]
    assert loss.pos_weight.tolist() == expected
    assert "pos_weight" not in loss.state_dict()  # from the config, never from a checkpoint


def test_shape_mismatch_names_the_shapes_and_the_tasks():
    loss = MultiTaskLoss(["a", "b"], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"logits \(4, 3\).*\[batch, 2\].*tasks: a, b"):
        loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="2 tasks but 1 pos_weights"):
        MultiTaskLoss(["a", "b"], [1.0])


def test_loss_weights_scale_each_task_in_the_total_but_not_the_per_task_losses():
    logits = [[0.5, -1.0], [2.0, 0.3]]
    labels = [[1.0, 0.0], [0.0, 1.0]]
    weights = [[1.0, 2.0], [0.5, 1.0]]
    loss = MultiTaskLoss(["a", "b"], [1.0, 1.0], [3.0, 0.5])
    total, per_task = loss(torch.tensor(logits), torch.tensor(labels), torch.tensor(weights))
    expected = [
        sum(bce(logits[i][t], labels[i][t], weights[i][t], 1.0) for i in range(2)) / 2 for t in range(2)
    ]
    assert per_task.tolist() == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx((3.0 * expected[0] + 0.5 * expected[1]) / 2, rel=1e-6)


def test_build_loss_takes_loss_weight_per_task_in_model_order():
    config = load_config(SMALL, ["model.tasks.recap.engagement.is_replied.loss_weight=4"])
    loss = build_loss(config.model)
    expected = [4.0 if t == "recap.engagement.is_replied" else 1.0 for t in config.task_names]
    assert loss.loss_weight.tolist() == expected
    assert "loss_weight" not in loss.state_dict()
