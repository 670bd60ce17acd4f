import numpy as np
import torch

from heavyranker.config.model import DcnConfig
from heavyranker.model.dcn import CrossLayer, build_dcn


def _np(t):
    return t.detach().double().numpy()


def test_cross_layer_closed_form():
    layer = CrossLayer(3)
    with torch.no_grad():
        layer.linear.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.5, 0.5, 0.5]]))
        layer.linear.bias.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x0 = torch.tensor([[1.0, 2.0, 3.0]])
    xl = torch.tensor([[0.0, 1.0, -2.0]])
    # W xl + b = [0 - 4 + 1, -1, (0 + 1 - 2) / 2 - 1] = [-3, -1, -1.5]; x0 * that + xl
    assert layer(x0, xl).tolist() == [[-3.0, -1.0, -6.5]]


def test_two_cross_layers_against_numpy():
    torch.manual_seed(0)
    dcn = build_dcn(4, DcnConfig(poly_degree=2))
    x0 = np.random.default_rng(0).normal(size=(6, 4))
    x = x0
    for layer in dcn.cross_layers:
        x = x0 * (x @ _np(layer.linear.weight).T + _np(layer.linear.bias)) + x
    got = dcn(torch.as_tensor(x0, dtype=torch.float32))
    assert dcn.out_features == 4
    np.testing.assert_allclose(got.detach().numpy(), x, rtol=1e-4, atol=1e-5)


def test_projection_factorises_w_with_one_bias():
    layer = CrossLayer(5, projection_dim=2)
    down, up = layer.linear
    assert (down.weight.shape, down.bias) == ((2, 5), None)
    assert up.weight.shape == (5, 2) and up.bias.shape == (5,)
    x0, xl = torch.randn(3, 5), torch.randn(3, 5)
    w = up.weight @ down.weight
    torch.testing.assert_close(layer(x0, xl), x0 * (xl @ w.T + up.bias) + xl)


def test_parallel_concatenates_cross_and_mlp_on_the_input():
    dcn = build_dcn(4, DcnConfig(poly_degree=1, parallel_mlp={"layer_sizes": [3]}, use_parallel=True))
    x0 = torch.randn(2, 4)
    cross = dcn.cross_layers[0](x0, x0)
    torch.testing.assert_close(dcn(x0), torch.cat([cross, dcn.parallel_mlp(x0)], dim=1))
    assert dcn.out_features == 7


def test_stacked_runs_the_mlp_on_the_cross_output_then_the_output_mlp():
    config = DcnConfig(
        poly_degree=1, parallel_mlp={"layer_sizes": [3]}, use_parallel=False, output_mlp={"layer_sizes": [1]}
    )
    dcn = build_dcn(4, config)
    assert dcn.parallel_mlp.layers[0].in_features == 4 and dcn.output_mlp.layers[0].in_features == 3
    x0 = torch.randn(2, 4)
    torch.testing.assert_close(dcn(x0), dcn.output_mlp(dcn.parallel_mlp(dcn.cross_layers[0](x0, x0))))
    assert dcn.out_features == 1
