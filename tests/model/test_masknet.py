import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from heavyranker.config.model import MaskNetConfig
from heavyranker.errors import UserError
from heavyranker.model.masknet import MaskBlock, build_mask_net


def _fill(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.as_tensor(rng.uniform(-1, 1, p.shape), dtype=torch.float32))


def _layer_norm(h, weight, bias, eps=1e-5):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + eps) * weight + bias


def _np(t):
    return t.detach().double().numpy()


def _block_numpy(block, x, mask_input):
    w1, b1 = _np(block.mask_layer[0].weight), _np(block.mask_layer[0].bias)
    w2, b2 = _np(block.mask_layer[2].weight), _np(block.mask_layer[2].bias)
    w3, b3 = _np(block.hidden_layer.weight), _np(block.hidden_layer.bias)
    if block.input_layer_norm is not None:
        x = _layer_norm(x, _np(block.input_layer_norm.weight), _np(block.input_layer_norm.bias))
    mask = np.maximum(mask_input @ w1.T + b1, 0) @ w2.T + b2
    return _layer_norm((x * mask) @ w3.T + b3, _np(block.layer_norm.weight), _np(block.layer_norm.bias))


def test_mask_block_by_hand():
    block = MaskBlock(
        in_features=2, mask_in_features=2, output_size=2, aggregation_size=1, input_layer_norm=False
    )
    with torch.no_grad():
        block.mask_layer[0].weight.copy_(torch.tensor([[1.0, 1.0]]))
        block.mask_layer[0].bias.fill_(0.0)
        block.mask_layer[2].weight.copy_(torch.tensor([[2.0], [-1.0]]))
        block.mask_layer[2].bias.copy_(torch.tensor([0.0, 1.0]))
        block.hidden_layer.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        block.hidden_layer.bias.fill_(0.0)
    x = torch.tensor([[1.0, 2.0]])
    # aggregation relu(1 + 2) = 3; mask = [6, -2]; x * mask = [6, -4]; layer norm: mean 1, std 5 -> [1, -1]
    np.testing.assert_allclose(block(x, x).detach().numpy(), [[1.0, -1.0]], atol=1e-5)


@pytest.mark.parametrize("input_layer_norm", [False, True])
def test_mask_block_against_numpy(input_layer_norm):
    rng = np.random.default_rng(0)
    block = MaskBlock(5, 3, output_size=4, aggregation_size=6, input_layer_norm=input_layer_norm)
    _fill(block, rng)
    x, m = rng.normal(size=(7, 5)), rng.normal(size=(7, 3))
    out = block(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(m, dtype=torch.float32))
    assert out.shape == (7, 4)
    np.testing.assert_allclose(out.detach().numpy(), _block_numpy(block, x, m), atol=1e-4)


class _MulDtypes(TorchDispatchMode):
    """The operand dtypes of every elementwise product that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mul.Tensor:
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("matmul", ["onednn", "aten"])
def test_under_bf16_autocast_the_gate_runs_in_bf16_and_x_keeps_an_fp32_gradient(matmul):
    rng = np.random.default_rng(1)
    # 512 x 256 = 2**17 weights: with "onednn" the hidden layer runs on model/linear.py's own bf16 path
    block = MaskBlock(512, 8, output_size=256, aggregation_size=16, input_layer_norm=True, matmul=matmul)
    _fill(block, rng)
    x = torch.tensor(rng.normal(size=(6, 512)), dtype=torch.float32, requires_grad=True)
    m = torch.as_tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    products = _MulDtypes()
    with products, torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, m)
    out.float().sum().backward()
    # forward and backward: no product of an fp32 tensor by a bf16 one (the slow, promoting kind)
    assert products.seen and all(dtypes == {torch.bfloat16} for dtypes in products.seen)
    assert x.grad.dtype == torch.float32
    # bf16 rounds every operand to 8 bits: the LayerNorm'd output agrees with fp32's to a few hundredths
    reference = _block_numpy(block, x.detach().double().numpy(), m.double().numpy())
    np.testing.assert_allclose(out.float().detach().numpy(), reference, atol=0.15)
    assert np.abs(out.float().detach().numpy() - reference).mean() < 0.02


def _config(use_parallel, mlp=None):
    blocks = [
        {"output_size": 4, "aggregation_size": 3, "input_layer_norm": False},
        {"output_size": 2, "reduction_factor": 0.5, "input_layer_norm": True},
    ]
    return MaskNetConfig(mask_blocks=blocks, use_parallel=use_parallel, mlp=mlp)


def test_parallel_wiring():
    rng = np.random.default_rng(1)
    net = build_mask_net(6, _config(use_parallel=True), "model.backbone.mask_net_config")
    _fill(net, rng)
    first, second = net.mask_blocks
    # every block reads the input as x and mask input; reduction_factor 0.5 of 6 inputs -> 3
    assert (first.hidden_layer.in_features, first.mask_layer[0].in_features) == (6, 6)
    assert (second.hidden_layer.in_features, second.mask_layer[0].out_features) == (6, 3)
    x = rng.normal(size=(5, 6))
    want = np.concatenate([_block_numpy(first, x, x), _block_numpy(second, x, x)], axis=1)
    assert net.out_features == 6
    np.testing.assert_allclose(net(torch.as_tensor(x, dtype=torch.float32)).detach().numpy(), want, atol=1e-4)


def test_stacked_wiring():
    rng = np.random.default_rng(2)
    net = build_mask_net(6, _config(use_parallel=False), "model.backbone.mask_net_config")
    _fill(net, rng)
    first, second = net.mask_blocks
    # block 2 reads block 1's output (4 wide) as x, and the original input (6 wide) as mask input
    assert (second.hidden_layer.in_features, second.mask_layer[0].in_features) == (4, 6)
    assert second.mask_layer[2].out_features == 4
    x = rng.normal(size=(5, 6))
    want = _block_numpy(second, _block_numpy(first, x, x), x)
    assert net.out_features == 2
    np.testing.assert_allclose(net(torch.as_tensor(x, dtype=torch.float32)).detach().numpy(), want, atol=1e-4)


def test_mlp_on_top():
    net = build_mask_net(6, _config(use_parallel=True, mlp={"layer_sizes": [3]}), "x")
    assert net.mlp.layers[0].in_features == 6 and net.out_features == 3
    assert net(torch.randn(2, 6)).shape == (2, 3)


def test_reduction_factor_too_small_names_the_field():
    config = MaskNetConfig(
        mask_blocks=[{"output_size": 4, "reduction_factor": 0.1, "input_layer_norm": False}]
    )
    with pytest.raises(UserError, match=r"model.backbone.mask_net_config.mask_blocks\[0\].reduction_factor"):
        build_mask_net(6, config, "model.backbone.mask_net_config")
