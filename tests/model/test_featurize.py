import json

import numpy as np
import pytest
import torch

from heavyranker.config import ConfigError, load_config
from heavyranker.config.model import FeaturizationConfig
from heavyranker.errors import DataError, UserError
from heavyranker.model.featurize import build_featurizer

SHAPES = {"continuous": (4,), "binary": (3,), "discrete": (2,)}
CONTINUOUS = np.array(
    [[0.0, -2.5, 1e6, np.nan], [3.0, 0.5, -1e30, np.inf], [-1.0, 7.0, 2.0, -np.inf], [0.25, -0.5, 9.0, 1.0]],
    dtype=np.float32,
)
BINARY = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float32)


def _features(binary_dtype=torch.float32, continuous=CONTINUOUS):
    return {
        "continuous": torch.from_numpy(continuous),
        "binary": torch.from_numpy(BINARY).to(binary_dtype),
        "discrete": torch.zeros(4, 2, dtype=torch.long),
    }


def _log(x):
    return np.sign(x) * np.log1p(np.abs(x))


def _run(config, **kwargs):
    featurizer = build_featurizer(FeaturizationConfig(**config), SHAPES)
    return featurizer, featurizer(_features(**kwargs)).detach().numpy()


def test_double_norm_log_against_numpy():
    config = {
        "double_norm_log_config": {
            "batch_norm_config": {"affine": True, "momentum": 0.01},
            "clip_magnitude": 1.5,
            "layer_norm_config": {"epsilon": 0.0, "center": True, "scale": True},
        }
    }
    featurizer, got = _run(config)
    x = _log(np.where(np.isfinite(CONTINUOUS), CONTINUOUS, 0.0).astype(np.float64))
    x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)  # batch statistics in training; affine starts at 1, 0
    x = np.clip(x, -1.5, 1.5)
    x = np.concatenate([x, BINARY], axis=1)
    x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True))
    assert featurizer.out_features == 7
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)
    bn = featurizer.transform[2]
    assert bn.momentum == 0.01 and bn.weight.shape == (4,)
    assert featurizer.layer_norm.weight.shape == (7,) and featurizer.layer_norm.bias.shape == (7,)


def test_double_norm_log_without_norms_and_with_a_bool_binary():
    _, got = _run({"double_norm_log_config": {"clip_magnitude": 5.0}}, binary_dtype=torch.bool)
    x = np.clip(_log(np.where(np.isfinite(CONTINUOUS), CONTINUOUS, 0.0)), -5, 5)
    np.testing.assert_allclose(got, np.concatenate([x, BINARY], axis=1), rtol=1e-6)


def test_log1p_abs_against_numpy():
    _, got = _run({"log1p_abs_config": {}, "feature_names_to_concat": []})
    finite = np.isfinite(CONTINUOUS)
    np.testing.assert_allclose(got[finite], _log(CONTINUOUS.astype(np.float64))[finite], rtol=1e-6)


def test_clip_log1p_abs_against_numpy():
    featurizer, got = _run({"clip_log1p_abs_config": {"clip_magnitude": 2.0}, "feature_names_to_concat": []})
    finite = np.isfinite(CONTINUOUS)
    np.testing.assert_allclose(
        got[finite], np.clip(_log(CONTINUOUS.astype(np.float64)), -2, 2)[finite], rtol=1e-6
    )
    assert featurizer.out_features == 4 and not list(featurizer.parameters())


def _stats(tmp_path, entries):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"features": entries}))
    return str(path)


STATS = [
    {"mean": 0.5, "std": 2.0},
    {"mean": -1.0, "std": 0.5},
    {"mean": 3.0, "std": 0.0},
    {"mean": 0.0, "std": 1.0},
]


@pytest.mark.parametrize("norm", [None, "use_batch_norm", "use_renorm"])
def test_z_score_log_against_numpy(tmp_path, norm):
    config = {"analysis_path": _stats(tmp_path, STATS), "clip_magnitude": 1.0}
    continuous = CONTINUOUS
    if norm:
        config[norm] = True
        continuous = np.nan_to_num(
            CONTINUOUS, nan=0.0, posinf=np.inf, neginf=-np.inf
        )  # NaN: whole-column stats
    featurizer, got = _run({"z_score_log_config": config}, continuous=continuous)
    mean = np.array([e["mean"] for e in STATS])
    std = np.array([1.0 if e["std"] == 0 else e["std"] for e in STATS])  # a constant column: std read as 1
    x = np.clip((_log(continuous.astype(np.float64)) - mean) / std, -1, 1)
    if norm == "use_batch_norm":  # training: batch statistics
        x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    # use_renorm: in training the value is normalised by the running statistics, which start at 0 and 1
    elif norm == "use_renorm":
        x = x / np.sqrt(1 + 1e-5)
    want = np.concatenate([x, BINARY], axis=1)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.isfinite(got), finite)  # NaN stays NaN: only double_norm_log zeroes it


def test_batch_renorm_gradients_flow_through_batch_statistics_and_stats_update(tmp_path):
    config = {"analysis_path": _stats(tmp_path, [{"mean": 0.0, "std": 1.0}] * 4), "use_renorm": True}
    featurizer = build_featurizer(
        FeaturizationConfig(z_score_log_config=config, feature_names_to_concat=[]), SHAPES
    )
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]], requires_grad=True)
    renorm = featurizer.transform[3]
    y = renorm(x)
    # d/dx of sum(y) through batch normalisation is zero: the batch mean absorbs any shift
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(renorm.running_mean, 0.1 * x.detach().mean(0))
    renorm.eval()
    torch.testing.assert_close(renorm(x), (x - renorm.running_mean) / (renorm.running_var + 1e-5).sqrt())


def test_z_score_stats_file_errors_name_the_file(tmp_path):
    short = _stats(tmp_path, STATS[:3])
    with pytest.raises(DataError, match=r"stats.json .*analysis_path.*statistics for 3 features.*has 4"):
        _run({"z_score_log_config": {"analysis_path": short}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"features": [{"mean": 1}]}')
    with pytest.raises(DataError, match=r"bad.json .*not a feature statistics file"):
        _run({"z_score_log_config": {"analysis_path": str(bad)}})
    with pytest.raises(DataError, match=r"missing.json .*cannot read"):
        _run({"z_score_log_config": {"analysis_path": str(tmp_path / "missing.json")}})
    negative = _stats(tmp_path, [*STATS[:3], {"mean": 0.0, "std": -1.0}])
    with pytest.raises(DataError, match=r"features\[3\]"):
        _run({"z_score_log_config": {"analysis_path": negative}})


def test_unknown_feature_to_concat_names_the_field():
    with pytest.raises(
        UserError, match=r"feature_names_to_concat: sparse is not a feature .*continuous, binary"
    ):
        _run({"log1p_abs_config": {}, "feature_names_to_concat": ["binary", "sparse"]})


def test_layer_norm_center_without_scale_is_refused():
    config = {"double_norm_log_config": {"layer_norm_config": {"center": True, "scale": False}}}
    with pytest.raises(UserError, match="layer_norm_config: center without scale"):
        _run(config)


def test_layer_norm_scale_without_center_has_no_bias():
    featurizer, _ = _run({"double_norm_log_config": {"layer_norm_config": {"center": False, "scale": True}}})
    assert featurizer.layer_norm.weight.shape == (7,) and featurizer.layer_norm.bias is None


def _t(value: float) -> float:
    """The x whose sign(x) * log1p(|x|) is `value`."""
    return float(np.sign(value) * np.expm1(abs(value)))


def test_piecewise_linear_encodes_each_feature_on_its_bins_by_hand(tmp_path):
    """Bin edges in log1p space. Feature 0: 4 bins [0, 1, 2, 3, 4]; feature 1: [0, 0, 0, 2] merges to one
    bin [0, 2]; feature 2 is constant (no bin: nothing in the input); feature 3: 2 bins [-1, 0, 1]."""
    edges = [[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0], [3.0, 3.0], [-1.0, 0.0, 1.0]]
    path = _stats(tmp_path, [{"quantiles": e} for e in edges])
    continuous = np.array(
        [
            [_t(1.5), _t(1.0), 5.0, _t(-0.5)],  # bin 2 of 4 at half; half of the one bin; bin 1 of 2 at half
            [_t(2.25), _t(3.0), -5.0, _t(2.0)],  # bin 3 at a quarter; past the last edge: saturated
            [_t(-1.0), np.nan, 0.0, _t(-3.0)],  # below the first edge: zeros; NaN reads as 0
            [0.0, 0.0, np.inf, 0.0],
        ],
        dtype=np.float32,
    )
    featurizer, out = _run({"piecewise_linear_config": {"analysis_path": path}}, continuous=continuous)
    expected = np.array(
        [
            [1, 0.5, 0, 0, 0.5, 0.5, 0],
            [1, 1, 0.25, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
        ]
    )
    assert featurizer.out_features == 7 + 3
    np.testing.assert_allclose(out[:, :7], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[:, 7:], BINARY)  # feature_names_to_concat: binary


def test_piecewise_linear_refuses_a_stats_file_without_quantiles(tmp_path):
    config = {"piecewise_linear_config": {"analysis_path": _stats(tmp_path, STATS)}}
    with pytest.raises(
        DataError, match=r"stats.json .*features\[0\] has no list of numbers `quantiles`.*--bins"
    ):
        _run(config)
    falling = _stats(tmp_path, [{"quantiles": [0.0, 1.0]}] * 3 + [{"quantiles": [1.0, 0.0]}])
    with pytest.raises(DataError, match=r"features\[3\].quantiles must be finite numbers in ascending order"):
        _run({"piecewise_linear_config": {"analysis_path": falling}})
    short = _stats(tmp_path, [{"quantiles": [0.0, 1.0]}] * 3)
    with pytest.raises(
        DataError, match=r"piecewise_linear_config.analysis_path.*statistics for 3 features.*has 4"
    ):
        _run({"piecewise_linear_config": {"analysis_path": short}})


def test_periodic_embeds_each_feature_through_its_frequencies_and_layer_by_hand():
    """Two features, one frequency each, 2 dimensions: v = sign(x) log1p(|x|) of 1, -1 and 0 (NaN) at
    frequencies 1/4 and 1/2 give angles of quarter and half turns, whose cos and sin are 0 and +-1."""
    shapes = {"continuous": (2,), "binary": (3,)}
    config = FeaturizationConfig(periodic_config={"n_frequencies": 1, "sigma": 1.0, "embedding_dim": 2})
    featurizer = build_featurizer(config, shapes)
    periodic = featurizer.transform[2]
    with torch.no_grad():
        periodic.frequencies.copy_(torch.tensor([[0.25], [0.5]]))
        # rows: the weights of cos, then of sin
        periodic.weight.copy_(torch.tensor([[[1.0, 2.0], [3.0, -4.0]], [[2.0, 0.0], [0.0, 1.0]]]))
        periodic.bias.copy_(torch.tensor([[0.5, -10.0], [3.0, 1.0]]))
    e1 = float(np.e - 1)
    continuous = torch.tensor([[e1, e1], [-e1, -e1], [np.nan, np.inf]])
    binary = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    out = featurizer({"continuous": continuous, "binary": binary}).detach().numpy()
    expected = [
        # feature 0 at v=1: angle pi/2, [cos, sin] = [0, 1] -> [3, -4] + [0.5, -10] = [3.5, -14] -> relu
        # feature 1 at v=1: angle pi, [-1, 0] -> [-2, 0] + [3, 1] = [1, 1]
        [3.5, 0.0, 1.0, 1.0],
        # v=-1: [0, -1] -> [-3, 4] + b = [-2.5, -6] -> 0, 0; angle -pi: [-1, 0] -> [1, 1] as above
        [0.0, 0.0, 1.0, 1.0],
        # non-finite as 0: [1, 0] -> [1, 2] + b = [1.5, -8] -> [1.5, 0]; [2, 0] + [3, 1] = [5, 1]
        [1.5, 0.0, 5.0, 1.0],
    ]
    assert featurizer.out_features == 2 * 2 + 3
    np.testing.assert_allclose(out[:, :4], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out[:, 4:], binary.numpy())


def test_periodic_frequencies_start_normal_with_the_configured_sigma_and_are_trained():
    config = FeaturizationConfig(periodic_config={"n_frequencies": 256, "sigma": 0.3, "embedding_dim": 5})
    torch.manual_seed(0)
    featurizer = build_featurizer(config, SHAPES)
    periodic = featurizer.transform[2]
    frequencies = periodic.frequencies.detach().numpy()
    assert frequencies.shape == (4, 256) and periodic.weight.shape == (4, 512, 5)
    # 1,024 draws of N(0, 0.3): the sample std is within 10% of 0.3 (its standard error is 2.2%)
    assert abs(frequencies.std() - 0.3) < 0.03 and abs(frequencies.mean()) < 0.03
    assert featurizer.out_features == 4 * 5 + 3
    featurizer(_features()).sum().backward()
    assert periodic.frequencies.grad is not None and periodic.frequencies.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"periodic_config": {}, "log1p_abs_config": {}},
            r"exactly one of .*log1p_abs_config.*periodic_config",
        ),
        ({"periodic_config": {"n_frequencies": 0}}, r"periodic_config.n_frequencies"),
        ({"periodic_config": {"sigma": -1.0}}, r"periodic_config.sigma"),
        ({"periodic_config": {"embedding_dim": 2**16}}, r"periodic_config.embedding_dim"),
        ({"periodic_config": {"frequencies": 3}}, r"periodic_config.frequencies"),
    ],
)
def test_periodic_config_errors_are_one_line_and_name_the_field(small_config_path, config, message):
    featurization = {**config, "feature_names_to_concat": ["binary"]}
    with pytest.raises(ConfigError, match=message) as error:
        load_config(small_config_path, [f"model.featurization_config={json.dumps(featurization)}"])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("entry", "config", "message"),
    [
        ({"mean": 1e39, "std": 1.0}, "z_score_log_config", r"features\[3\]: mean 1e\+39 .*finite as float32"),
        (
            {"mean": 0.0, "std": 1e39},
            "z_score_log_config",
            r"features\[3\]: .*std 1e\+39 .*finite as float32",
        ),
        (
            {"quantiles": [0.0, 1e39]},
            "piecewise_linear_config",
            r"features\[3\].quantiles .*finite as float32",
        ),
        ({"quantiles": [-3e38, 3e38]}, "piecewise_linear_config", r"features\[3\].quantiles .*differences"),
    ],
)
def test_statistics_beyond_float32_are_refused(tmp_path, entry, config, message):
    """Finite in the JSON's float64 but not as the float32 buffers: before, a mean of 1e39 made its column's
    z-scores NaN, a std of 1e39 made them 0, and an edge (or a bin width) beyond float32 left the feature
    without bins or with a bin of width inf, all silently."""
    other = {"mean": 0.0, "std": 1.0, "quantiles": [0.0, 1.0]}
    path = _stats(tmp_path, [other] * 3 + [{**other, **entry}])
    with pytest.raises(DataError, match=rf"stats.json .*{message}"):
        _run({config: {"analysis_path": path}})


@pytest.mark.parametrize(
    ("entry", "config", "message"),
    [
        ({"mean": "1.5", "std": 1.0}, "z_score_log_config", r"not a feature statistics file.*'1\.5' is not"),
        ({"mean": 0.0, "std": True}, "z_score_log_config", r"not a feature statistics file.*True is not"),
        ({"quantiles": ["0", "1"]}, "piecewise_linear_config", r"features\[3\] has no list of numbers"),
        ({"quantiles": [0.0, False]}, "piecewise_linear_config", r"features\[3\] has no list of numbers"),
    ],
    ids=["mean-string", "std-boolean", "quantiles-strings", "quantile-boolean"],
)
def test_statistics_that_are_not_json_numbers_are_refused(tmp_path, entry, config, message):
    # Were read as numbers: float("1.5") and float(True) both work, and numpy reads ["0", "1"] as floats.
    other = {"mean": 0.0, "std": 1.0, "quantiles": [0.0, 1.0]}
    path = _stats(tmp_path, [other] * 3 + [{**other, **entry}])
    with pytest.raises(DataError, match=rf"stats.json .*{message}"):
        _run({config: {"analysis_path": path}})


def test_more_bins_than_data_stats_writes_are_refused(tmp_path):
    """Before: any count was taken, and the [features, most bins] buffers and the input width grew with it
    (a million quantiles: 4 GB a feature). 1025 quantiles (1024 bins, `data stats --bins`' most) load."""
    most = _stats(tmp_path, [{"quantiles": np.linspace(0.0, 1.0, 1025).tolist()}] * 4)
    featurizer, _ = _run({"piecewise_linear_config": {"analysis_path": most}})
    assert featurizer.out_features == 4 * 1024 + 3
    more = _stats(tmp_path, [{"quantiles": [0.0, 1.0]}] * 3 + [{"quantiles": list(range(1026))}])
    with pytest.raises(DataError, match=r"stats.json .*features\[3\] has 1026 quantiles, at most 1025"):
        _run({"piecewise_linear_config": {"analysis_path": more}})


def test_a_stats_file_is_read_only_as_far_as_its_features_need(tmp_path):
    """Before: a file of any size was read whole (a 10 GB one named by mistake: 10 GB in memory), and JSON
    nested too deep was a RecursionError traceback. A stats file for 4 features is read up to 5 x 64 KiB."""
    padded = tmp_path / "padded.json"
    padded.write_text(json.dumps({"features": STATS}) + " " * 5 * 2**16)
    with pytest.raises(DataError, match=r"padded.json .*over 327,680 characters for 4 features"):
        _run({"z_score_log_config": {"analysis_path": str(padded)}})
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=r"deep.json .*not a feature statistics file.*RecursionError"):
        _run({"z_score_log_config": {"analysis_path": str(deep)}})


def test_batch_renorm_on_a_training_batch_of_one_row_keeps_its_running_statistics(tmp_path):
    """Before: one row's unbiased variance (NaN) went into running_var, and every output after it was NaN,
    silently. Now the row is normalised by the running statistics (what renorm's training output equals)."""
    config = {"analysis_path": _stats(tmp_path, [{"mean": 0.0, "std": 1.0}] * 4), "use_renorm": True}
    featurizer = build_featurizer(FeaturizationConfig(z_score_log_config=config), SHAPES)
    renorm = featurizer.transform[-1]
    renorm.running_mean.copy_(torch.tensor([0.5, 0.0, -0.5, 1.0]))
    renorm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25, 1.0]))
    x = torch.tensor([[2.5, 1.0, 0.0, 1.0]])
    expected = (x - renorm.running_mean) / (renorm.running_var + 1e-5).sqrt()  # weight 1, bias 0
    torch.testing.assert_close(renorm.train()(x), expected)
    assert renorm.running_var.tolist() == [4.0, 1.0, 0.25, 1.0] and torch.isfinite(renorm.running_mean).all()


def test_an_empty_list_of_quantiles_is_refused_and_one_edge_is_no_bins(tmp_path):
    """Before: [] passed the checks, and the buffers' build failed with torch's RuntimeError (a size
    mismatch) when another feature had two bins or more. One edge (data stats' [0.0] for a column without a
    finite value) is a feature without bins, as a constant one."""
    two_bins = {"quantiles": [0.0, 1.0, 2.0]}
    empty = _stats(tmp_path, [{"quantiles": []}, two_bins, two_bins, two_bins])
    with pytest.raises(DataError, match=r"stats.json .*features\[0\].quantiles is empty"):
        _run({"piecewise_linear_config": {"analysis_path": empty}})
    one_edge = _stats(tmp_path, [{"quantiles": [0.0]}, two_bins, two_bins, two_bins])
    featurizer, _ = _run({"piecewise_linear_config": {"analysis_path": one_edge}})
    assert featurizer.out_features == 3 * 2 + 3  # three features of two bins, then the binary
