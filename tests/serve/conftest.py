"""One exported local_small model for every serve test: initial weights with randomized batch-norm
statistics (so eval-mode normalisation is not the identity), saved as a checkpoint at step 7 and exported,
as torch.export program and as ONNX model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import Config, load_config
from heavyranker.data.shapes import feature_shapes
from heavyranker.model import Ranker, build_model
from heavyranker.serve.export import export_model
from tests.conftest import CONFIGS

# is_replied's negatives kept at 1%, its positives at 50%: the calibration is not the identity. The backbone's
# last layer (128 -> 1024) is large enough to run on oneDNN in the eager model (model/linear.py): the
# exported programs must hold plain linear products all the same.
OVERRIDES = [
    "train_data.tasks.recap.engagement.is_replied={pos_downsampling_rate: 0.5, neg_downsampling_rate: 0.01}",
    "model.backbone.mask_net_config.mlp.layer_sizes=[1024]",
]
STEP = 7


@dataclass
class Exported:
    config: Config
    model: Ranker  # the eager model, in eval mode, with the exported weights
    folder: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.set_num_threads(1)
    config = load_config(CONFIGS / "local_small.yaml", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(config, feature_shapes(config.train_data))
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0.0, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    root = tmp_path_factory.mktemp("serve")
    state = {"model": model.state_dict(), "step": STEP}
    checkpoint = save_checkpoint(root / "run" / "checkpoints", STEP, state)
    folder = export_model(config, checkpoint=str(checkpoint), out=str(root / "model"), format="pt2")
    return Exported(config, model.eval(), folder, checkpoint)


@pytest.fixture(scope="session")
def exported_onnx(exported: Exported) -> Path:
    """The same checkpoint exported as an ONNX model: the folder."""
    out = exported.folder.parent / "model_onnx"
    return export_model(exported.config, checkpoint=str(exported.checkpoint), out=str(out), format="onnx")


def random_features(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Features as the data has them: heavy-tailed continuous values (with some NaN and inf, which the
    featurization zeroes), 0/1 flags, small discrete ids, unit-scale embeddings, int64 meta ids."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        size = (n, *shape)
        if name == "continuous":
            values = (rng.standard_t(3, size) * 5).astype(np.float32)
            values[rng.random(size) < 0.02] = np.nan
            values[rng.random(size) < 0.01] = np.inf
            out[name] = values
        elif name == "binary":
            out[name] = rng.integers(0, 2, size).astype(np.float32)
        elif name == "discrete" or name.startswith("meta__"):
            out[name] = rng.integers(0, 1 << 40, size, dtype=np.int64)
        else:
            out[name] = rng.standard_normal(size).astype(np.float32)
    return out


def score_tolerance(weights: dict[str, float]) -> float:
    """How far the score may move when each probability is off by at most 1e-5: sum_i |w_i| * 1e-5."""
    return 1e-5 * sum(abs(w) for w in weights.values())
