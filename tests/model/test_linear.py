import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from heavyranker.model import linear
from heavyranker.model.linear import Linear, Matmul

needs_onednn = pytest.mark.skipif(not linear.HAS_ONEDNN, reason="this torch has no oneDNN linear kernel")
# These tests are about the oneDNN path, whichever kernel this CPU's default is (cpu.preferred_matmul).
ONEDNN_IF_PRESENT: Matmul = "onednn" if linear.HAS_ONEDNN else "aten"


@pytest.fixture(autouse=True)
def every_size_on_onednn(monkeypatch):
    """The products of these small layers go to oneDNN too, as a large layer's do."""
    monkeypatch.setattr(linear, "MIN_WEIGHTS", 0)


class _Ops(TorchDispatchMode):
    """The names of the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _layer(
    in_features: int, out_features: int, bias: bool = True, matmul: Matmul = ONEDNN_IF_PRESENT
) -> Linear:
    torch.manual_seed(0)
    return Linear(in_features, out_features, bias=bias, matmul=matmul)


def test_a_hand_computed_product_forward_and_backward():
    layer = _layer(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
        layer.bias.fill_(0.5)
    x = torch.tensor([[1.0, 3.0], [4.0, 2.0]], requires_grad=True)
    y = layer(x)
    assert y.tolist() == [[2 - 3 + 0.5], [8 - 2 + 0.5]]
    (y * torch.tensor([[1.0], [10.0]])).sum().backward()
    assert x.grad.tolist() == [[2.0, -1.0], [20.0, -10.0]]  # g_i * w
    assert layer.weight.grad.tolist() == [[1 * 1 + 10 * 4, 1 * 3 + 10 * 2]]  # sum_i g_i * x_i
    assert layer.bias.grad.tolist() == [11.0]


@needs_onednn
def test_the_products_run_on_onednn_in_training_and_inference():
    layer, x = _layer(16, 8, matmul="onednn"), torch.randn(4, 16, requires_grad=True)
    with _Ops() as ops:
        layer(x).sum().backward()
    # forward, grad of x, grad of weight: three oneDNN products and no aten matmul
    assert ops.names.count("mkldnn::_linear_pointwise") == 3
    assert not {"aten::mm", "aten::addmm", "aten::linear"} & set(ops.names)
    with _Ops() as ops, torch.no_grad():
        layer(x)
    assert ops.names == ["mkldnn::_linear_pointwise"]


@pytest.mark.parametrize(
    "batch, in_features, out_features, bias",
    [(128, 96, 40, True), (7, 1, 1, True), (5, 33, 1, False), (0, 8, 3, True)],
)
def test_forward_and_gradients_match_f_linear(batch, in_features, out_features, bias):
    layer = _layer(in_features, out_features, bias)
    x = torch.randn(batch, in_features, requires_grad=True)
    upstream = torch.randn(batch, out_features)
    y = layer(x)
    (y * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_()
    b_ref = layer.bias.detach().clone().requires_grad_() if bias else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, w_ref.grad)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad)


def test_strided_input_and_gradient():
    # A MaskNet block reads a slice of a concatenation and hands back a slice of its gradient.
    layer = _layer(12, 6)
    wide = torch.randn(10, 30, requires_grad=True)
    x = wide[:, 5:17]
    y = torch.cat([layer(x), torch.zeros(10, 4)], dim=1)[:, :6]
    upstream = torch.randn(10, 8)[:, 1:7]
    (y * upstream).sum().backward()
    expected = torch.zeros(10, 30)
    expected[:, 5:17] = upstream @ layer.weight.detach()
    torch.testing.assert_close(wide.grad, expected)
    torch.testing.assert_close(layer.weight.grad, upstream.t() @ x.detach())


def test_the_broadcast_gradient_of_a_sum():
    # sum().backward() hands the layer an expanded gradient: every stride 0.
    layer, x = _layer(12, 6), torch.randn(5, 12)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(6, 12))
    torch.testing.assert_close(layer.bias.grad, torch.full((6,), 5.0))


def test_what_onednn_does_not_take_goes_through_f_linear():
    layer = _layer(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    with _Ops() as ops:
        y = layer(x)
    assert "mkldnn::_linear_pointwise" not in ops.names
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    batched = _layer(6, 3)(torch.randn(2, 4, 6))  # 3-D input
    assert batched.shape == (2, 4, 3)


@needs_onednn
def test_small_layers_stay_on_f_linear(monkeypatch):
    monkeypatch.setattr(linear, "MIN_WEIGHTS", 1 << 17)
    small, large = _layer(256, 128, matmul="onednn"), _layer(512, 256, matmul="onednn")
    x = torch.randn(4, 512)
    with _Ops() as ops:
        small(x[:, :256])
    assert "mkldnn::_linear_pointwise" not in ops.names
    with _Ops() as ops:
        large(x)
    assert ops.names == ["mkldnn::_linear_pointwise"]


def test_an_aten_layer_runs_f_linear():
    layer, x = _layer(16, 8, matmul="aten"), torch.randn(4, 16, requires_grad=True)
    with _Ops() as ops:
        layer(x).sum().backward()
    assert "mkldnn::_linear_pointwise" not in ops.names
    assert "aten::addmm" in ops.names  # F.linear's forward with a bias


def test_onednn_where_torch_lacks_the_kernel_is_an_error(monkeypatch):
    monkeypatch.setattr(linear, "HAS_ONEDNN", False)  # as in a torch without it
    with pytest.raises(ValueError, match='matmul="onednn": torch .* has no oneDNN linear kernel'):
        Linear(4, 2, matmul="onednn")
    assert Linear(4, 2, matmul="aten").matmul == "aten"


def test_an_unknown_matmul_is_an_error():
    with pytest.raises(ValueError, match='matmul must be "onednn" or "aten", not \'mkl\''):
        Linear(4, 2, matmul="mkl")


def test_an_exported_program_holds_plain_linear_nodes():
    layer = _layer(16, 8)
    program = torch.export.export(layer, (torch.randn(4, 16),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets == {"aten.linear.default"}


def test_state_dict_is_nn_linear_s():
    layer = _layer(5, 2)
    reference = torch.nn.Linear(5, 2)
    assert layer.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5)
    torch.testing.assert_close(layer(x), reference(x))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16, back in fp32: the operands of a bf16 product, for a reference in fp32."""
    return t.detach().bfloat16().float()


@needs_onednn
def test_under_bf16_autocast_the_products_run_on_onednn_in_bf16_with_fp32_gradients():
    first, second = _layer(24, 16, matmul="onednn"), _layer(16, 8, matmul="onednn")
    x = torch.randn(32, 24, requires_grad=True)
    upstream = torch.randn(32, 8)
    with _Ops() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = first(x)
            y = second(hidden)
        (y.float() * upstream).sum().backward()
    assert hidden.dtype == y.dtype == torch.bfloat16
    # 2 layers x (forward, grad of x, grad of weight)
    assert ops.names.count("mkldnn::_linear_pointwise") == 6
    assert not {"aten::mm", "aten::addmm", "aten::linear"} & set(ops.names)
    assert x.grad.dtype == first.weight.grad.dtype == first.bias.grad.dtype == torch.float32
    # A reference in fp32 from bf16-rounded operands; bf16 rounds each product's output to 8 bits too.
    h_ref = _bf16(x) @ _bf16(first.weight).t() + _bf16(first.bias)
    torch.testing.assert_close(hidden.float(), h_ref, rtol=1e-2, atol=1e-2)
    g_hidden = _bf16(_bf16(upstream) @ _bf16(second.weight))
    torch.testing.assert_close(second.weight.grad, _bf16(upstream).t() @ _bf16(hidden), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(second.bias.grad, _bf16(upstream).sum(0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(first.weight.grad, g_hidden.t() @ _bf16(x), rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(x.grad, g_hidden @ _bf16(first.weight), rtol=2e-2, atol=5e-2)


@needs_onednn
def test_under_bf16_autocast_a_bf16_input_is_not_cast_again():
    layer, x = _layer(16, 8, matmul="onednn"), torch.randn(4, 16).bfloat16()
    with _Ops() as ops, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert ops.names.count("aten::_to_copy") == 2  # the weight and the bias; x is already bf16
    assert ops.names.count("mkldnn::_linear_pointwise") == 1


def test_a_bf16_input_without_autocast_still_goes_through_f_linear():
    layer, x = _layer(16, 8), torch.randn(4, 16).bfloat16()
    with pytest.raises(RuntimeError):  # F.linear's dtype check, as for nn.Linear
        layer(x)
