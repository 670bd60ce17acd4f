"""feature_shapes and feature_specs, which the model and the export are built from without reading data,
against the batches RecapDataset actually yields for the shipped configs' data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from heavyranker.config import load_config
from heavyranker.config.data import DataConfig
from heavyranker.data.columns import feature_specs
from heavyranker.data.dataset import RecapDataset
from heavyranker.data.shapes import feature_shapes
from heavyranker.data.synthetic import generate_for_config
from tests.conftest import CONFIGS

FAV, REPLIED = "recap.engagement.is_favorited", "recap.engagement.is_replied"


def assert_specs_are_the_batch(data: DataConfig) -> None:
    with RecapDataset(data) as dataset:
        batch = next(iter(dataset))
    shapes = {name: tuple(values.shape[1:]) for name, values in batch.features.items()}
    dtypes = {name: values.dtype for name, values in batch.features.items()}
    assert feature_shapes(data) == shapes
    assert {name: spec.dtype for name, spec in feature_specs(data).items()} == dtypes


def test_local_small(small_data):
    config = load_config(CONFIGS / "local_small.yaml", [f"train_data.inputs={small_data}/train/*.gz"])
    assert_specs_are_the_batch(config.train_data)


def test_local_prod(tmp_path):
    config = load_config(CONFIGS / "local_prod.yaml")
    generate_for_config(config, out=str(tmp_path), examples=32, files=1, seed=0)
    data = config.train_data.model_copy(update={"inputs": f"{tmp_path}/train/*.gz", "global_batch_size": 8})
    assert data.preprocess and data.preprocess.truncate_and_slice  # the shapes are not the schema's
    assert_specs_are_the_batch(data)


def test_local_small_with_every_preprocessor(small_data, tmp_path: Path):
    np.save(tmp_path / "continuous.npy", np.arange(40) % 3)
    np.save(tmp_path / "binary.npy", np.array([1, 0] * 8))
    data = load_config(CONFIGS / "local_small.yaml").train_data.model_dump()
    data["inputs"] = f"{small_data}/train/*.gz"
    data["seg_dense_schema"]["mask_mantissa_features"] = {"user_embedding": 10}
    data["preprocess"] = {
        "downsample_negatives": {"batch_multiplier": 2, "engagements_list": [FAV], "num_engagements": 13},
        "truncate_and_slice": {
            "continuous_feature_truncation": 40,
            "continuous_feature_mask_path": str(tmp_path / "continuous.npy"),
            "binary_feature_mask_path": str(tmp_path / "binary.npy"),
        },
        "downcast": {"features": {"continuous": "bfloat16", "binary": "bool", "user_embedding": "float16"}},
        "rectify_labels": {  # ids standing in for timestamps: the shapes are what matters here
            "served_timestamp_field": "meta.tweet_id",
            "impressed_timestamp_field": "meta__tweet_id",
            "label_to_engaged_timestamp_field": {FAV: "meta.tweet_id", REPLIED: "meta.user_id"},
        },
        "extract_features": {
            "extract_feature_table": [
                {"name": "c3", "source_tensor": "continuous", "index": 3},
                {"name": "b0", "source_tensor": "binary", "index": 0},
                {"name": "d1", "source_tensor": "discrete", "index": 1},
            ]
        },
    }
    assert_specs_are_the_batch(DataConfig.model_validate(data))
