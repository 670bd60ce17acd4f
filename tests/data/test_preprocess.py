"""Each preprocessor on hand-made arrays, against hand-computed results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heavyranker.config.data import (
    DownCast,
    DownsampleNegatives,
    ExtractFeatures,
    Preprocess,
    RectifyLabels,
    TruncateAndSlice,
)
from heavyranker.data.batch import Rows
from heavyranker.data.preprocess import (
    Downcaster,
    FeatureExtractor,
    LabelRectifier,
    NegativeDownsampler,
    Truncator,
    build_preprocessors,
    round_to_bfloat16,
)
from heavyranker.errors import UserError

HOUR_MS = 3_600_000


def examples(labels, weights=None, **features) -> Rows:
    labels = np.array(labels, dtype=np.float32)
    weights = np.ones_like(labels) if weights is None else np.array(weights, dtype=np.float32)
    ids = np.arange(len(labels))
    return Rows({"id": ids, **features}, labels, weights, ("fav", "reply", "report")[: labels.shape[1]])


def preprocess(rows: Rows, config: Preprocess, *, labels: bool = True) -> Rows:
    for preprocessor in build_preprocessors(config, labels=labels):
        rows = preprocessor.apply(rows)
    return rows


def test_downsample_negatives_reference_example():
    # The reference's docstring: fav = [1, 0, 0, 0], multiplier 2 -> fav = [1, 0], weights [1, 3].
    ex = NegativeDownsampler(
        DownsampleNegatives(batch_multiplier=2, engagements_list=["fav"], num_engagements=1)
    ).apply(examples([[1], [0], [0], [0]]))
    assert ex.features["id"].tolist() == [0, 1]
    assert ex.labels.tolist() == [[1], [0]] and ex.weights.tolist() == [[1], [3]]


def test_downsample_negatives_keeps_positives_of_any_engagement():
    labels = [
        [0, 0, 0],
        [0, 1, 0],
        [0, 0, 0],
        [1, 0, 0],
        [0, 0, 1],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
    ]
    weights = np.full((9, 3), 2.0)
    ex = NegativeDownsampler(
        DownsampleNegatives(batch_multiplier=3, engagements_list=["fav", "reply"], num_engagements=3)
    ).apply(examples(labels, weights))
    # 9 read, 3 kept: positives 1 and 3 (row 4 is a positive of report only, not listed), then negative 0,
    # which stands for the 7 negatives: weight 2 * 7 / 1 in every column.
    assert ex.features["id"].tolist() == [1, 3, 0]
    np.testing.assert_allclose(ex.weights, [[2, 2, 2], [2, 2, 2], [14, 14, 14]])
    # Unbiased totals: kept negative weight equals the weight of all negatives read.
    assert ex.weights[2, 0] == pytest.approx(2.0 * 7)


def test_downsample_negatives_with_more_positives_than_room():
    ex = NegativeDownsampler(
        DownsampleNegatives(batch_multiplier=2, engagements_list=["fav"], num_engagements=1)
    ).apply(examples([[1], [1], [1], [0]]))
    assert ex.features["id"].tolist() == [0, 1] and ex.weights.tolist() == [[1], [1]]


def test_downsample_negatives_partial_batch_rounds_up():
    ex = NegativeDownsampler(
        DownsampleNegatives(batch_multiplier=2, engagements_list=["fav"], num_engagements=1)
    ).apply(examples([[0]] * 5))
    assert len(ex) == 3 and ex.weights[:, 0] == pytest.approx([5 / 3] * 3)


def test_truncate_and_slice(tmp_path):
    continuous = np.arange(20, dtype=np.float32).reshape(2, 10)
    binary = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.save(tmp_path / "mask.npy", np.array([0, 1, 0, 2]))  # over the first 4 columns: keep 1 and 3
    ex = examples([[0], [0]], continuous=continuous, binary=binary)
    Truncator(
        TruncateAndSlice(
            continuous_feature_truncation=3,
            binary_feature_truncation=4,
            binary_feature_mask_path=str(tmp_path / "mask.npy"),
        )
    ).apply(ex)
    assert ex.features["continuous"].tolist() == [[0, 1, 2], [10, 11, 12]]
    assert ex.features["binary"].tolist() == [[1, 3], [7, 9]]
    assert ex.features["continuous"].flags.c_contiguous


def test_slicing_mask_longer_than_the_feature(tmp_path):
    np.save(tmp_path / "mask.npy", np.array([0, 0, 0, 1]))
    ex = examples([[0]], continuous=np.zeros((1, 5), dtype=np.float32))
    config = TruncateAndSlice(
        continuous_feature_truncation=3, continuous_feature_mask_path=str(tmp_path / "mask.npy")
    )
    with pytest.raises(UserError, match=r"mask\.npy: the mask keeps column 3, but the feature has 3 columns"):
        Truncator(config).apply(ex)


def test_downcast():
    values = np.array([[0.0, 1.5, -2.0, 300.0]], dtype=np.float32)
    ex = examples([[0]], a=values.copy(), b=values.copy(), c=np.array([[0, 3, 255]]), d=values.copy())
    Downcaster(DownCast(features={"a": "float16", "b": "bool", "c": "uint8", "d": "bfloat16"})).apply(ex)
    assert ex.features["a"].dtype == np.float16 and ex.features["a"].tolist() == [[0.0, 1.5, -2.0, 300.0]]
    assert ex.features["b"].tolist() == [[False, True, True, True]]
    assert ex.features["c"].dtype == np.uint8 and ex.features["c"].tolist() == [[0, 3, 255]]
    assert ex.features["d"].tolist() == [[0.0, 1.5, -2.0, 300.0]]  # all exact in bfloat16


def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 1000),
            np.array([np.inf, -np.inf, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8, 0.0, -0.0], np.float32),
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bfloat16(values), expected)
    assert np.isnan(round_to_bfloat16(np.array([np.nan], np.float32))).all()
    assert round_to_bfloat16(np.array([1 + 2**-8], np.float32))[0] == 1.0  # a tie goes to even


def test_rectify_labels_window():
    served = np.full(6, 10 * HOUR_MS)
    impressed = served + np.array([0, 5, 5, 5, HOUR_MS, -1])
    engaged = served + np.array([HOUR_MS - 1, HOUR_MS, 7, -1, 7, 7])
    ex = examples(np.ones((6, 2)), weights=np.full((6, 2), 3.0))
    ex.extras = {"served": served, "impressed": impressed, "fav_at": engaged}
    LabelRectifier(
        RectifyLabels(
            label_rectification_window_in_hours=1.0,
            served_timestamp_field="served",
            impressed_timestamp_field="impressed",
            label_to_engaged_timestamp_field={"fav": "fav_at"},
        )
    ).apply(ex)
    # Kept only when served <= impressed, engaged < served + 1 hour:
    # row 0 in; 1 engaged at exactly 1 hour: out; 2 in; 3 engaged before serving: out;
    # 4 impressed at exactly 1 hour: out; 5 impressed before serving: out.
    assert ex.labels[:, 0].tolist() == [1, 0, 1, 0, 0, 0]
    assert ex.labels[:, 1].tolist() == [1] * 6  # reply has no engaged timestamp: untouched
    assert (ex.weights == 3.0).all()


def test_rectify_labels_fractional_window_and_feature_timestamps():
    ex = examples(
        [[1], [1]],
        served=np.array([0, 0]),
        impressed=np.array([0, 0]),
        fav_at=np.array([HOUR_MS // 2 - 1, HOUR_MS // 2]),
    )
    LabelRectifier(
        RectifyLabels(
            label_rectification_window_in_hours=0.5,
            served_timestamp_field="served",
            impressed_timestamp_field="impressed",
            label_to_engaged_timestamp_field={"fav": "fav_at"},
        )
    ).apply(ex)
    assert ex.labels[:, 0].tolist() == [1, 0]


def test_extract_features():
    ex = examples([[0], [0]], continuous=np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32))
    FeatureExtractor(
        ExtractFeatures(extract_feature_table=[{"name": "second", "source_tensor": "continuous", "index": 1}])
    ).apply(ex)
    assert ex.features["second"].tolist() == [2.0, 5.0] and ex.features["second"].shape == (2,)
    with pytest.raises(UserError, match=r"extract_features \(bad\): index 3 is out of range for continuous"):
        FeatureExtractor(
            ExtractFeatures(
                extract_feature_table=[{"name": "bad", "source_tensor": "continuous", "index": 3}]
            )
        ).apply(ex)
    with pytest.raises(UserError, match=r"no feature nope"):
        FeatureExtractor(
            ExtractFeatures(extract_feature_table=[{"name": "bad", "source_tensor": "nope", "index": 0}])
        ).apply(ex)


def test_order_and_prediction_skips_label_preprocessors():
    config = Preprocess(
        downsample_negatives=DownsampleNegatives(
            batch_multiplier=2, engagements_list=["fav"], num_engagements=1
        ),
        truncate_and_slice=TruncateAndSlice(continuous_feature_truncation=2),
        extract_features=ExtractFeatures(
            extract_feature_table=[{"name": "last", "source_tensor": "continuous", "index": 1}]
        ),
    )
    continuous = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]], dtype=np.float32)
    ex = preprocess(examples([[0], [1], [0], [0]], continuous=continuous.copy()), config)
    # Downsampled first (row 1 positive, then row 0), truncated, then column 1 of the truncated values.
    assert ex.features["id"].tolist() == [1, 0] and ex.features["last"].tolist() == [5, 2]
    no_labels = Rows(
        {"continuous": continuous.copy()}, np.zeros((4, 0), np.float32), np.zeros((4, 0), np.float32), ()
    )
    ex = preprocess(no_labels, config, labels=False)
    assert ex.features["last"].tolist() == [2, 5, 8, 11]


def test_unknown_task_is_named():
    with pytest.raises(UserError, match=r"engagements_list: like is not a task of this data config"):
        NegativeDownsampler(
            DownsampleNegatives(batch_multiplier=2, engagements_list=["like"], num_engagements=1)
        ).apply(examples([[1]]))


def test_bad_masks_and_fields_are_named(tmp_path):
    np.save(tmp_path / "square.npy", np.ones((2, 2)))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    ex = examples([[0]], continuous=np.zeros((1, 4), dtype=np.float32), stamps=np.zeros((1, 2)))
    for name, problem in (
        ("square", r"must be a vector, this one has shape \(2, 2\)"),
        ("junk", "cannot read"),
    ):
        with pytest.raises(UserError, match=rf"{name}\.npy: .*{problem}"):
            Truncator(TruncateAndSlice(continuous_feature_mask_path=str(tmp_path / f"{name}.npy"))).apply(ex)
    with pytest.raises(UserError, match=r"downcast\.features: no feature nope"):
        Downcaster(DownCast(features={"nope": "bool"})).apply(ex)
    config = RectifyLabels(
        served_timestamp_field="stamps",
        impressed_timestamp_field="stamps",
        label_to_engaged_timestamp_field={"fav": "stamps"},
    )
    with pytest.raises(UserError, match=r"served_timestamp_field: stamps must hold one value per example"):
        LabelRectifier(config).apply(ex)


def test_too_many_positives_warn_once_per_downsampler(caplog):
    """The warning is once per downsampler (each dataset builds its own), not once per process: a second
    run in the same process is told too."""
    config = DownsampleNegatives(batch_multiplier=2, engagements_list=["fav"], num_engagements=1)
    crowded = [[1], [1], [1], [0]]
    with caplog.at_level("WARNING", logger="heavyranker.data.preprocess.downsample_negatives"):
        first = NegativeDownsampler(config)
        first.apply(examples(crowded))
        first.apply(examples(crowded))
        NegativeDownsampler(config).apply(examples([[0]] * 4))  # room for every positive: no warning
        NegativeDownsampler(config).apply(examples(crowded))
    assert [r.getMessage().startswith("downsample_negatives: 3 positives in 4") for r in caplog.records] == [
        True,
        True,
    ]
