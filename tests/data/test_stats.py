"""`heavyranker data stats`: per-column mean and std of sign(x) * log1p(|x|), against numpy on the rows."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from heavyranker.cli import main
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.stats import write_feature_stats
from heavyranker.data.synthetic import generate_for_config
from heavyranker.data.tf_example import encode_tf_examples
from heavyranker.errors import UserError
from heavyranker.model.featurize import load_feature_stats
from tests.data.test_synthetic import TASKS, decode, write_config


def numpy_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """count, mean and std of the finite values of sign(x) * log1p(|x|), per column; 0, 0, 0 for none."""
    t = np.sign(x.astype(np.float64)) * np.log1p(np.abs(x.astype(np.float64)))
    t[~np.isfinite(t)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of an all-NaN column
        return (
            np.isfinite(t).sum(axis=0),
            np.nan_to_num(np.nanmean(t, axis=0)),
            np.nan_to_num(np.nanstd(t, axis=0)),
        )


def read(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    features = json.loads(path.read_text())["features"]
    return tuple(np.array([f[k] for f in features]) for k in ("count", "mean", "std"))


def truncated(data):
    data["train_data"]["preprocess"] = {"truncate_and_slice": {"continuous_feature_truncation": 40}}


def test_stats_of_all_training_rows_match_numpy(tmp_path):
    config = write_config(tmp_path, truncated)
    files = [f for f in generate_for_config(config, examples=1000, files=2, seed=0) if "/train/" in f]
    write_feature_stats(
        config.train_data, seed=config.training.seed, out=str(tmp_path / "stats.json"), batches=100
    )
    count, mean, std = read(tmp_path / "stats.json")
    continuous = decode(files, config, ["home_recap_2022_cont__segdense_vals"])[
        "home_recap_2022_cont__segdense_vals"
    ]
    expected = numpy_stats(continuous[:, :40])
    assert len(mean) == 40 and (count == 1000).all()
    np.testing.assert_allclose(mean, expected[1], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, expected[2], rtol=1e-9, atol=1e-12)
    # What the z_score_log featurization reads back.
    loaded_mean, loaded_std = load_feature_stats(str(tmp_path / "stats.json"), 40)
    np.testing.assert_allclose(loaded_mean.numpy(), mean, rtol=1e-6)


def test_stats_read_the_first_batches_only(tmp_path):
    config = write_config(tmp_path)  # batches of 256
    files = [f for f in generate_for_config(config, examples=1000, files=1, seed=0) if "/train/" in f]
    write_feature_stats(
        config.train_data, seed=config.training.seed, out=str(tmp_path / "stats.json"), batches=2
    )
    count, mean, std = read(tmp_path / "stats.json")
    continuous = decode(files, config, ["home_recap_2022_cont__segdense_vals"])[
        "home_recap_2022_cont__segdense_vals"
    ]
    _, expected_mean, expected_std = numpy_stats(continuous[:512])
    assert (count == 512).all()
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, expected_std, rtol=1e-9, atol=1e-12)


def test_non_finite_values_are_left_out_and_an_empty_column_gets_zeros(tmp_path):
    config = write_config(tmp_path)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((300, 48)) * 100).astype(np.float32)  # negatives too: sign(x) log1p(|x|)
    x[::3, 0] = np.nan
    x[1::7, 1] = np.inf
    x[:, 2] = -np.inf
    rows = {"home_recap_2022_cont__segdense_vals": x, **{t: np.zeros((300, 1), np.int64) for t in TASKS}}
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    write_records(str(folder / "part-0.gz"), encode_tf_examples(rows))
    write_feature_stats(
        config.train_data, seed=config.training.seed, out=str(tmp_path / "stats.json"), batches=10
    )
    count, mean, std = read(tmp_path / "stats.json")
    expected_count, expected_mean, expected_std = numpy_stats(x)
    assert count[0] == 200 and count[2] == 0 and mean[2] == 0 and std[2] == 0
    np.testing.assert_array_equal(count, expected_count)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, expected_std, rtol=1e-9, atol=1e-12)


def test_cli_writes_stats_and_refuses_no_batches(tmp_path, capsys):
    write_config(tmp_path)
    config_path = str(tmp_path / "config.yaml")
    main(["data", "generate", "--config", config_path, "--examples", "300", "--files", "1"])
    out = tmp_path / "sub" / "stats.json"
    assert main(["data", "stats", "--config", config_path, "--out", str(out), "--batches", "1"]) == 0
    assert len(read(out)[1]) == 48
    assert main(["data", "stats", "--config", config_path, "--out", str(out), "--batches", "0"]) == 2
    assert "--batches must be positive" in capsys.readouterr().err
    config = write_config(tmp_path)
    with pytest.raises(UserError):
        write_feature_stats(config.train_data, seed=config.training.seed, out=str(out), batches=-1)


@pytest.mark.parametrize("command", ["stats", "dump"])
@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_data_is_read(tmp_path, capsys, command, where):
    # Was found only after reading the data (none here: the config's files do not exist), and for stats
    # named the path without --out.
    write_config(tmp_path)
    (tmp_path / "a-file").write_text("")
    out = {"folder": tmp_path, "under-a-file": tmp_path / "a-file" / "out.json"}[where]
    assert main(["data", command, "--config", str(tmp_path / "config.yaml"), "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err
        == {
            "folder": f"error: data {command}: --out {out} is a folder; give the name of a file to write\n",
            "under-a-file": f"error: data {command}: --out {out}: cannot create its folder: File exists\n",
        }[where]
    )


def test_bins_add_each_columns_quantiles_over_the_finite_values(tmp_path):
    config = write_config(tmp_path)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((300, 48)) * 100).astype(np.float32)
    x[::3, 0] = np.nan
    x[:, 2] = -np.inf
    rows = {"home_recap_2022_cont__segdense_vals": x, **{t: np.zeros((300, 1), np.int64) for t in TASKS}}
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    write_records(str(folder / "part-0.gz"), encode_tf_examples(rows))
    out = tmp_path / "stats.json"
    write_feature_stats(config.train_data, seed=config.training.seed, out=str(out), batches=10, bins=4)
    features = json.loads(out.read_text())["features"]
    t = np.sign(x.astype(np.float64)) * np.log1p(np.abs(x.astype(np.float64)))
    for j in (0, 1, 47):
        finite = t[np.isfinite(t[:, j]), j]
        # float32 rows: the quantiles of the float32-rounded transformed values
        expected = np.quantile(finite.astype(np.float32).astype(np.float64), [0, 0.25, 0.5, 0.75, 1])
        np.testing.assert_allclose(features[j]["quantiles"], expected, rtol=1e-6)
    assert features[2]["quantiles"] == [0.0]  # no finite value
    plain = tmp_path / "plain.json"
    write_feature_stats(config.train_data, seed=config.training.seed, out=str(plain), batches=10)
    assert "quantiles" not in json.loads(plain.read_text())["features"][0]  # only with bins


def test_cli_refuses_bins_out_of_range(tmp_path, capsys):
    write_config(tmp_path)
    config_path = str(tmp_path / "config.yaml")
    main(["data", "generate", "--config", config_path, "--examples", "300", "--files", "1"])
    out = str(tmp_path / "stats.json")
    assert (
        main(["data", "stats", "--config", config_path, "--out", out, "--batches", "1", "--bins", "0"]) == 2
    )
    assert "--bins must be 1 to 1024" in capsys.readouterr().err
    assert (
        main(["data", "stats", "--config", config_path, "--out", out, "--batches", "1", "--bins", "8"]) == 0
    )
    assert all(
        len(f["quantiles"]) == 9 for f in json.loads((tmp_path / "stats.json").read_text())["features"]
    )
