"""Hashed and managed id tables export and serve as they score in eager: raw 64-bit ids, negative ids, ids
never seen in training (the managed default row), and id lists that are all padding."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.export import export_model
from heavyranker.serve.request import parse_candidates
from heavyranker.serve.scorer import Scorer
from tests.conftest import CONFIGS
from tests.serve.conftest import random_features

TABLES = [
    "model.large_embeddings={tables: ["
    "{name: lists, num_embeddings: 64, embedding_dim: 4, feature_name: discrete, id_mapping: hash, "
    "num_hashes: 2, combiner: mean},"
    "{name: users, num_embeddings: 16, embedding_dim: 4, feature_name: meta__user_id, id_mapping: managed, "
    "min_count: 2, eviction: lfu}]}",
    "model.small_embeddings={tables: [{name: column, num_embeddings: 10, embedding_dim: 4, index: 3, "
    "id_mapping: hash}]}",
]
SEEN_USERS = [2**63 - 1, -(2**63), -12345, 1_234_567_890_123]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The config, the eager model (eval) after training-mode forwards that admit SEEN_USERS, and its
    checkpoint."""
    config = load_config(CONFIGS / "local_small.yaml", TABLES)
    torch.manual_seed(0)
    specs = feature_specs(config.train_data)
    model = build_model(config.model, specs, config.train_data.tasks)
    shapes = {name: spec.shape for name, spec in specs.items()}
    for seed in (0, 1):
        features = {k: torch.from_numpy(v) for k, v in random_features(shapes, 4, seed=seed).items()}
        features["meta__user_id"] = torch.tensor(SEEN_USERS)
        model(features)
    assert set(model.large_embeddings["users"].mapping.resident()) == set(SEEN_USERS)
    model.eval()
    folder = tmp_path_factory.mktemp("id_tables")
    checkpoint = save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0})
    return config, model, checkpoint


def id_features(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, np.ndarray]:
    """Raw ids of every size and sign, seen and unseen users, and discrete rows that are all padding."""
    features = random_features(shapes, n, seed=n)
    rng = np.random.default_rng(n)
    features["discrete"] = rng.integers(-(2**63), 2**63 - 1, (n, 8), dtype=np.int64, endpoint=True)
    features["discrete"][0] = -1  # an empty list: padding only
    features["discrete"][1, :4] = -1
    users = [*SEEN_USERS, 42, -1, 2**62]  # 42 and 2**62 never seen: the default row; -1: padding
    features["meta__user_id"] = np.array([users[i % len(users)] for i in range(n)], dtype=np.int64)
    return features


@pytest.mark.parametrize("format", ["pt2", "onnx"])
def test_exported_id_tables_score_as_the_eager_model(trained, tmp_path, format):
    config, model, checkpoint = trained
    folder = export_model(config, checkpoint=str(checkpoint), out=str(tmp_path), format=format)
    manifest = json.loads((folder / "manifest.json").read_text())
    shapes = {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}
    assert {"discrete", "meta__user_id"} <= set(shapes)
    scorer = Scorer(folder)
    session = onnxruntime.InferenceSession(str(folder / "model.onnx")) if format == "onnx" else None
    for n in (3, 17):
        features = id_features(shapes, n)
        tensors = {k: torch.from_numpy(v) for k, v in features.items()}
        with torch.no_grad():
            eager = model(tensors)["calibrated_probabilities"]
        torch.testing.assert_close(scorer(tensors)[0], eager, rtol=1e-5, atol=1e-5)
        if session is not None:  # and onnxruntime on its own, as Triton runs it
            (probabilities,) = session.run(["probabilities"], features)
            np.testing.assert_allclose(probabilities, eager.numpy(), rtol=0, atol=1e-5)


def test_unseen_users_score_through_the_default_row(trained):
    _, model, _ = trained
    users = model.large_embeddings["users"]
    weight = users.embedding.weight
    with torch.no_grad():
        out = users(torch.tensor([42, -1, 2**62, SEEN_USERS[0]]))
    torch.testing.assert_close(out[[0, 2]], weight[[0, 0]])
    torch.testing.assert_close(out[1], torch.zeros(4))  # -1 is the padding id: no id, zeros
    assert not torch.equal(out[3], weight[0])


def test_json_requests_carry_the_extreme_ids_to_the_scorer(trained, tmp_path):
    config, model, checkpoint = trained
    scorer = Scorer(export_model(config, checkpoint=str(checkpoint), out=str(tmp_path), format="pt2"))
    shapes = {spec.name: spec.shape for spec in scorer.inputs}
    features = id_features(shapes, 7)
    body = {
        "candidates": [
            {"id": i, "features": {k: v[i].tolist() for k, v in features.items()}} for i in range(7)
        ]
    }
    _, arrays = parse_candidates(json.dumps(body).encode(), scorer.inputs, 10)
    np.testing.assert_array_equal(arrays["meta__user_id"], features["meta__user_id"])
    np.testing.assert_array_equal(arrays["discrete"], features["discrete"])
    with torch.no_grad():
        eager = model({k: torch.from_numpy(v) for k, v in features.items()})["calibrated_probabilities"]
    torch.testing.assert_close(scorer({k: torch.from_numpy(v) for k, v in arrays.items()})[0], eager)
