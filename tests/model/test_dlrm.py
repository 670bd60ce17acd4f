import numpy as np
import pytest
import torch

from heavyranker.config.model import DLRMConfig
from heavyranker.errors import UserError
from heavyranker.model.dlrm import build_dlrm

CONFIG = DLRMConfig(bottom_mlp={"layer_sizes": [2]}, top_mlp={"layer_sizes": [1]})


def test_interactions_by_hand():
    # input: dense [d0, d1] at columns 0-1 and 5; vectors u at 2-3, v at 6-7; column 4 is dense too
    dlrm = build_dlrm(8, CONFIG, [(2, 2), (6, 2)], "model.tasks.t.dlrm_config")
    assert dlrm.bottom_mlp.layers[0].in_features == 4  # columns 0, 1, 4, 5
    with torch.no_grad():
        dlrm.bottom_mlp.layers[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))
        dlrm.bottom_mlp.layers[0].bias.zero_()
        dlrm.top_mlp.layers[0].weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0]]))
        dlrm.top_mlp.layers[0].bias.zero_()
    x = torch.tensor([[1.0, 9.0, 2.0, 3.0, 9.0, 4.0, -1.0, 1.0]])
    # bottom z = [x0, x5] = [1, 4]; u = [2, 3]; v = [-1, 1]
    # top input: [z, z.u, z.v, u.v] = [1, 4, 14, 3, 1]
    assert dlrm.top_mlp.layers[0].in_features == 5
    assert dlrm(x).item() == pytest.approx(1 + 40 + 1400 + 3000 + 10000)


def test_interaction_shape_and_values_against_numpy():
    torch.manual_seed(0)
    dlrm = build_dlrm(3 + 3 * 2, CONFIG, [(3, 2), (5, 2), (7, 2)], "x")
    x = torch.randn(4, 9)
    z = dlrm.bottom_mlp(x[:, :3])
    vectors = np.stack([z.detach().numpy(), x[:, 3:5].numpy(), x[:, 5:7].numpy(), x[:, 7:9].numpy()], axis=1)
    dots = [vectors[:, i] @ vectors[:, j].T for i in range(4) for j in range(i + 1, 4)]
    pairs = np.stack([np.diag(d) for d in dots], axis=1)  # [B, 6]
    top_in = np.concatenate([z.detach().numpy(), pairs], axis=1)
    w, b = dlrm.top_mlp.layers[0].weight.detach().numpy(), dlrm.top_mlp.layers[0].bias.detach().numpy()
    assert dlrm.top_mlp.layers[0].in_features == 2 + 6
    np.testing.assert_allclose(dlrm(x).detach().numpy(), top_in @ w.T + b, rtol=1e-5, atol=1e-5)


def test_no_vectors_is_bottom_then_top():
    dlrm = build_dlrm(5, CONFIG, [], "x")
    x = torch.randn(3, 5)
    torch.testing.assert_close(dlrm(x), dlrm.top_mlp(dlrm.bottom_mlp(x)))


def test_vector_width_must_match_the_bottom_output():
    with pytest.raises(UserError, match=r"model.tasks.t.dlrm_config.bottom_mlp: .* width 3 at column 4"):
        build_dlrm(7, CONFIG, [(4, 3)], "model.tasks.t.dlrm_config")
