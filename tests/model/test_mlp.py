import numpy as np
import pytest
import torch
from torch import nn

from heavyranker.config.model import MlpConfig
from heavyranker.model.mlp import Mlp, build_mlp


def _set(linear: nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


def test_layer_order_of_a_tower():
    mlp = build_mlp(
        8,
        MlpConfig(
            layer_sizes=[4, 3, 1], batch_norm={"affine": False, "momentum": 0.1}, dropout={"rate": 0.2}
        ),
    )
    kinds = [type(m).__name__ for m in mlp.layers]
    assert kinds == [
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
        "BatchNorm1d",
        "ReLU",
        "Dropout",
        "Linear",
    ]
    assert not mlp.layers[1].affine and mlp.layers[1].momentum == 0.1
    assert mlp.layers[3].p == 0.2
    assert mlp.out_features == 1


def test_final_layer_activation_and_no_batch_norm():
    mlp = build_mlp(8, MlpConfig(layer_sizes=[16], final_layer_activation=True))
    assert [type(m).__name__ for m in mlp.layers] == ["Linear", "ReLU"]


def test_per_layer_dropout_replaces_the_mlp_wide_one():
    config = MlpConfig(
        layers=[
            {"layer_size": 4, "dropout": {"rate": 0.3}},
            {"layer_size": 4},
            {"layer_size": 2, "dropout": {"rate": 0.5}},
        ],
        dropout={"rate": 0.1},
    )
    mlp = build_mlp(3, config)
    assert [type(m).__name__ for m in mlp.layers] == [
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "ReLU",
        "Dropout",
        "Linear",
        "Dropout",
    ]
    assert [m.p for m in mlp.layers if isinstance(m, nn.Dropout)] == [0.3, 0.1, 0.5]


def test_xavier_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    mlp = build_mlp(300, MlpConfig(layer_sizes=[200, 1]))
    bound = np.sqrt(6.0 / (300 + 200))
    w = mlp.layers[0].weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    assert all(m.bias.abs().sum() == 0 for m in mlp.layers if isinstance(m, nn.Linear))


def test_hand_computed_value():
    mlp = Mlp(2, [2, 1], [None, None])
    _set(mlp.layers[0], [[1.0, -1.0], [2.0, 0.5]], [0.5, -3.0])
    _set(mlp.layers[2], [[3.0, -2.0]], [0.25])
    x = torch.tensor([[1.0, 2.0], [4.0, -2.0]])
    # row 0: hidden [1-2+.5, 2+1-3] = [-0.5, 0] -> relu [0, 0] -> 0.25
    # row 1: hidden [4+2+.5, 8-1-3] = [6.5, 4] -> 3*6.5 - 2*4 + .25 = 11.75
    assert mlp(x).tolist() == [[0.25], [11.75]]


def test_batch_norm_uses_batch_statistics_in_training():
    mlp = Mlp(1, [2, 1], [None, None], batch_norm_momentum=0.5, batch_norm_affine=False)
    _set(mlp.layers[0], [[1.0], [-1.0]], [0.0, 0.0])
    _set(mlp.layers[3], [[1.0, 1.0]], [0.0])
    x = torch.tensor([[1.0], [3.0]])
    out = mlp(x)
    # hidden unit 0: [1, 3] -> normalised [-1, 1] (eps 1e-5), unit 1: [-1, -3] -> [1, -1]; relu; sum
    np.testing.assert_allclose(out.detach().numpy().ravel(), [1.0, 1.0], rtol=1e-4)
    # running mean moves half way from 0 to the batch mean; running var to the unbiased batch variance (2)
    np.testing.assert_allclose(mlp.layers[1].running_mean.numpy(), [1.0, -1.0])
    np.testing.assert_allclose(mlp.layers[1].running_var.numpy(), [1.5, 1.5])


def test_a_training_batch_of_one_row_is_normalised_by_the_running_statistics_and_leaves_them():
    """One row has no variance: torch's BatchNorm1d raised a ValueError (a run whose batch
    ignore_data_errors cut to one row ended there). Now it is evaluation's normalisation, by hand below."""
    mlp = Mlp(1, [2, 1], [None, None], batch_norm_momentum=0.5, batch_norm_affine=False)
    _set(mlp.layers[0], [[1.0], [-1.0]], [0.0, 0.0])
    _set(mlp.layers[3], [[1.0, 1.0]], [0.0])
    norm = mlp.layers[1]
    norm.running_mean.copy_(torch.tensor([1.0, -2.0]))
    norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    out = mlp.train()(torch.tensor([[3.0]]))
    # hidden [3, -3] -> ((3 - 1) / 2, (-3 + 2) / 0.5) = (1, -2) (eps 1e-5); relu: (1, 0); sum: 1
    np.testing.assert_allclose(out.detach().numpy(), [[1.0]], rtol=1e-4)
    assert norm.running_mean.tolist() == [1.0, -2.0] and norm.running_var.tolist() == [4.0, 0.25]
    assert int(norm.num_batches_tracked) == 0
