"""MMoE, PLE, the piecewise-linear and periodic featurizations and the wide path export as the rest do: the
pt2 and ONNX programs give the eager model's probabilities, and the rank endpoint serves them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.app import create_app
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import Scorer
from tests.conftest import CONFIGS
from tests.serve.conftest import SHAPES, random_features, serving

RARE = "recap.engagement.is_replied_reply_engaged_by_author"
EXPERT = "expert: {mlp_config: {layer_sizes: [32, 16], final_layer_activation: true}}"
VARIANTS = {
    "mmoe": [
        "model.multi_task_type=mmoe",
        "model.backbone=null",
        f"model.experts={{num_experts: 3, {EXPERT}}}",
    ],
    "ple": [
        "model.multi_task_type=ple",
        "model.backbone=null",
        f"model.experts={{num_experts: 1, num_shared_experts: 2, num_levels: 2, {EXPERT}}}",
    ],
    "piecewise_linear": [],  # its stats file is written per test
    "periodic": [
        "model.featurization_config={periodic_config: {n_frequencies: 4, sigma: 0.5, embedding_dim: 3}}"
    ],
    "wide": [f"model.tasks.{task}.wide=true" for task in ("recap.engagement.is_favorited", RARE)],
}


def _stats_file(folder: Path) -> str:
    """Quantile edges (4 bins) of sign(x) log1p(|x|) of random_features' continuous values, feature 1
    constant: features of 4 bins and one of none."""
    x = random_features(SHAPES, 2000, seed=99)["continuous"].astype(np.float64)
    t = np.sign(x) * np.log1p(np.abs(x))
    features = []
    for j in range(x.shape[1]):
        finite = t[np.isfinite(t[:, j]), j]
        quantiles = [0.0] if j == 1 else np.quantile(finite, np.linspace(0, 1, 5)).tolist()
        features.append({"quantiles": quantiles})
    path = folder / "stats.json"
    path.write_text(json.dumps({"features": features}))
    return str(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> tuple:
    """(eager model in eval mode, pt2 folder, ONNX folder) of local_small with the variant, its weights
    randomised so that no gate is near uniform and no wide path is zero."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    overrides = [f"training.save_dir={root / 'run'}", *VARIANTS[request.param]]
    if request.param == "piecewise_linear":
        featurization = f"{{piecewise_linear_config: {{analysis_path: {_stats_file(root)}}}}}"
        overrides.append(f"model.featurization_config={featurization}")
    config = load_config(CONFIGS / "local_small.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if (name.startswith("experts.") and "gates" in name) or name.startswith("wide."):
                parameter.normal_(0.0, 0.5, generator=gen)
    checkpoint = save_checkpoint(root / "run" / "checkpoints", 3, {"model": model.state_dict(), "step": 3})
    folders = [
        export_model(config, checkpoint=str(checkpoint), out=str(root / fmt), format=fmt)
        for fmt in ("pt2", "onnx")
    ]
    return model.eval(), *folders


def test_both_programs_give_the_eager_probabilities(exported):
    model, pt2, onnx = exported
    features = {k: torch.from_numpy(v) for k, v in random_features(SHAPES, 37, seed=3).items()}
    with torch.no_grad():
        eager = model(features)["calibrated_probabilities"]
    for folder in (pt2, onnx):
        probabilities, _ = Scorer(folder)(features)
        torch.testing.assert_close(probabilities, eager, rtol=1e-5, atol=1e-5)


def test_the_rank_endpoint_serves_the_model(exported):
    model, pt2, _ = exported
    features = random_features(SHAPES, 5, seed=4)
    candidates = [{"id": i, "features": {k: v[i].tolist() for k, v in features.items()}} for i in range(5)]
    with serving(create_app(pt2)) as url:
        body = json.dumps({"candidates": candidates})  # NaN and Infinity among the continuous values
        response = httpx.post(
            f"{url}/v1/rank", content=body, headers={"content-type": "application/json"}, timeout=60
        )
    assert response.status_code == 200, response.text
    with torch.no_grad():
        eager = model({k: torch.from_numpy(v) for k, v in features.items()})["calibrated_probabilities"]
    for candidate in response.json()["candidates"]:
        served = list(candidate["probabilities"].values())
        np.testing.assert_allclose(served, eager[candidate["id"]].numpy(), rtol=0, atol=1e-5)
