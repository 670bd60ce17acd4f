import numpy as np
import pytest
import torch

from heavyranker.model.embeddings import LargeEmbedding, PositionDebias, SmallEmbedding


def test_small_embedding_out_of_range_ids_get_the_reserved_row():
    table = SmallEmbedding(num_embeddings=5, embedding_dim=3, column=1)
    assert table.embedding.weight.shape == (6, 3)
    discrete = torch.tensor([[9, 0], [9, 4], [9, 5], [9, -1], [9, 10**12]])
    out = table(discrete)
    weight = table.embedding.weight
    torch.testing.assert_close(out, weight[[0, 4, 5, 5, 5]])


def test_large_embedding_mean_pools_and_skips_padding():
    table = LargeEmbedding(num_embeddings=4, embedding_dim=2, feature_name="ids")
    assert table.embedding.weight.shape == (4, 2)
    with torch.no_grad():
        table.embedding.weight.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]))
    ids = torch.tensor([[0, 1, 3], [2, -1, 7], [-1, -1, 4]])
    # row 0: mean of rows 0, 1, 3; row 1: only id 2 is valid; row 2: no valid id -> zeros
    np.testing.assert_allclose(
        table(ids).detach().numpy(), [[8 / 3, 11 / 3], [4.0, 5.0], [0.0, 0.0]], rtol=1e-6
    )


def test_large_embedding_of_a_scalar_feature():
    table = LargeEmbedding(num_embeddings=4, embedding_dim=2, feature_name="ids")
    torch.testing.assert_close(table(torch.tensor([3, 1])), table.embedding.weight[[3, 1]])


def test_position_buckets_and_drop_in_training():
    debias = PositionDebias(max_position=4, num_dims=2, drop_probability=0.0, column=0)
    weight = debias.embedding.weight
    assert weight.shape == (6, 2)
    positions = torch.tensor([[0], [3], [4], [100], [-2]])
    # positions >= max_position share row 4; a negative position is unknown: row 5
    torch.testing.assert_close(debias.train()(positions), weight[[0, 3, 4, 4, 5]])
    # at inference the position is always dropped
    torch.testing.assert_close(debias.eval()(positions), weight[[5, 5, 5, 5, 5]])
    debias.drop_probability = 1.0
    torch.testing.assert_close(debias.train()(positions), weight[[5, 5, 5, 5, 5]])


def test_position_dropped_with_its_probability_in_training():
    torch.manual_seed(0)
    debias = PositionDebias(max_position=256, num_dims=1, drop_probability=0.3, column=2)
    with torch.no_grad():
        debias.embedding.weight.zero_()
        debias.embedding.weight[257] = 1.0  # the "unknown" row
    discrete = torch.zeros(20000, 3, dtype=torch.long)
    assert debias.train()(discrete).mean().item() == pytest.approx(0.3, abs=0.02)
