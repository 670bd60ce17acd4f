"""The synthetic data generator: files the reader decodes into the schema's shapes, a truth sidecar that
agrees with the labels, realistic features, a truth a linear model cannot reach, determinism, downsampled
splits, file placement, and the errors a person can make."""

from __future__ import annotations

import copy
import glob
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import StandardScaler

from heavyranker.cli import main
from heavyranker.config import Config, load_config
from heavyranker.data.sources.files import select_files
from heavyranker.data.sources.tfrecord import read_records
from heavyranker.data.synthetic import PROFILES, World, generate_for_config, layout_for
from heavyranker.data.synthetic.truth import load_truth, truth_path
from heavyranker.data.tf_example import ExampleDecoder
from heavyranker.errors import DataError, UserError
from heavyranker.schema import load_schema
from tests.conftest import CONFIGS

SMALL = yaml.safe_load((CONFIGS / "local_small.yaml").read_text())
TASKS = list(SMALL["train_data"]["tasks"])
FAV, REPORT, RETWEET = (
    f"recap.engagement.{t}" for t in ("is_favorited", "is_report_tweet_clicked", "is_retweeted")
)


def write_config(tmp_path: Path, edit=None, schema: list | None = None) -> Config:
    """local_small.yaml with its data under tmp_path/data/<split>, the schema beside it (`schema`: entries
    (name, dtype, length), default segdense_small.json), after `edit(dict)`."""
    data = copy.deepcopy(SMALL)
    schema_path = tmp_path / "schema.json"
    if schema is None:
        schema_path.write_text((CONFIGS / "segdense_small.json").read_text())
    else:
        schema_path.write_text(
            json.dumps({"schema": [{"feature_name": n, "dtype": d, "length": k} for n, d, k in schema]})
        )
    data["training"]["save_dir"] = str(tmp_path / "run")
    for name, split in [("train", data["train_data"]), *data["validation_data"].items()]:
        split["seg_dense_schema"]["schema_path"] = str(schema_path)
        split["inputs"] = str(tmp_path / "data" / name / "*.gz")
    if edit:
        edit(data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def decode(files: list[str], config: Config, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Every schema feature (or `names`) of the files, decoded by the reader's decoder, files in order."""
    specs = load_schema(config.train_data.seg_dense_schema.schema_path)
    decoder = ExampleDecoder(specs, names or list(specs))
    parts = [decoder.decode_batch(list(read_records(f)), file=f) for f in files]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def binomial_gap(labels: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """|sum of labels - sum of probabilities| and 4.5 standard deviations of the labels' sum (+1)."""
    return abs(labels.sum() - p.sum()), 4.5 * np.sqrt((p * (1 - p)).sum()) + 1


def rce(labels: np.ndarray, p: np.ndarray) -> float:
    return 100 * (1 - log_loss(labels, p, labels=[0, 1]) / log_loss(labels, np.full(len(p), labels.mean())))


# --- the local_small schema, generated once for the tests that only read


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Config, list[str]]:
    tmp = tmp_path_factory.mktemp("small")
    config = write_config(tmp)
    files = generate_for_config(config, examples=24_000, files=4, seed=3)
    return config, [f for f in files if "/train/" in f]


def test_labels_agree_with_truth_overall_and_by_decile(small):
    config, files = small
    truth = load_truth(files)
    labels = decode(files, config, TASKS)
    for j, task in enumerate(truth.tasks):
        y, p = labels[task][:, 0], truth.true_probabilities[:, j].astype(np.float64)
        assert np.array_equal(y, truth.true_labels[:, j]), task
        gap, bound = binomial_gap(y, p)
        assert gap <= bound, (task, gap, bound)
    # Calibration: within each decile of the planted probability, the labels follow it.
    p = truth.probabilities([FAV])[:, 0].astype(np.float64)
    y = labels[FAV][:, 0]
    for rows in np.array_split(np.argsort(p), 10):
        gap, bound = binomial_gap(y[rows], p[rows])
        assert gap <= bound, (gap, bound)


def test_base_rates_are_realistic_and_differ(small):
    _, files = small
    truth = load_truth(files)
    rates = dict(zip(truth.tasks, truth.true_probabilities.mean(axis=0), strict=True))
    for task, rate in rates.items():
        assert rate == pytest.approx(PROFILES[task.removeprefix("recap.engagement.")].rate, rel=0.25), task
    assert rates[FAV] > 0.05 and rates[REPORT] < 0.0015 and rates[FAV] > 40 * rates[REPORT]
    assert len({round(float(r), 4) for r in rates.values()}) >= 10


def test_features_look_like_real_rows(small):
    config, files = small
    renamed = config.train_data.seg_dense_schema.renamed_features
    x = decode(files, config, list(renamed.values()))
    continuous = x[renamed["continuous"]]
    assert (continuous >= 0).all()
    zeros = (continuous == 0).mean(axis=0)
    assert 0.2 < zeros.mean() < 0.8 and (zeros > 0.5).sum() >= 5  # many exact zeros, some columns mostly 0
    nonzero = continuous[continuous > 0]
    assert np.quantile(nonzero, 0.999) > 100 * np.median(nonzero)  # heavy tails
    binary = x[renamed["binary"]]
    assert set(np.unique(binary)) == {0, 1} and binary.mean() < 0.2
    discrete = x[renamed["discrete"]]
    assert discrete.min() >= 0 and all(len(np.unique(c)) > 1 for c in discrete.T)
    # Users and authors recur, with the same embedding every time; tweet ids are snowflake-sized.
    users = x[renamed["meta__user_id"]][:, 0]
    assert len(np.unique(users)) < len(users) / 3
    embedding = x[renamed["user_embedding"]]
    same_user = users == users[0]
    assert same_user.sum() > 1 and (embedding[same_user] == embedding[0]).all()
    authors = x[renamed["meta__author_id"]][:, 0]
    first = authors == authors[0]
    assert (x[renamed["author_embedding"]][first] == x[renamed["author_embedding"]][first][0]).all()
    assert (x[renamed["meta__tweet_id"]] > 2**53).all()


def test_tasks_are_correlated(small):
    _, files = small
    truth = load_truth(files)
    y = truth.labels([FAV, RETWEET])
    assert np.corrcoef(y.T)[0, 1] > 0.05


def test_linear_model_falls_well_short_of_the_truth(small):
    """The demo's premise: a logistic regression on log counts, flags and embeddings leaves much of the
    best achievable RCE to a model that learns interactions."""
    config, files = small
    renamed = config.train_data.seg_dense_schema.renamed_features
    x = decode(files, config, list(renamed.values()) + [FAV])
    continuous = x[renamed["continuous"]].astype(np.float64)
    features = np.hstack(
        [np.log1p(continuous), x[renamed["binary"]]]
        + [x[renamed[e]] for e in ("user_embedding", "user_eng_embedding", "author_embedding")]
    )
    y = x[FAV][:, 0]
    p_true = load_truth(files).probabilities([FAV])[:, 0].astype(np.float64)
    fit, test = slice(0, 18_000), slice(18_000, None)
    scaler = StandardScaler().fit(features[fit])
    lr = LogisticRegression(max_iter=500).fit(scaler.transform(features[fit]), y[fit])
    p_lr = lr.predict_proba(scaler.transform(features[test]))[:, 1]
    truth_rce, lr_rce = rce(y[test], p_true[test]), rce(y[test], p_lr)
    assert truth_rce > 8
    assert truth_rce - lr_rce > 4, (truth_rce, lr_rce)
    assert roc_auc_score(y[test], p_true[test]) - roc_auc_score(y[test], p_lr) > 0.03


def test_validation_is_not_a_copy_of_train(small):
    config, files = small
    validation = select_files(config.validation_data["validation"])
    train_ids, validation_ids = load_truth(files).ids, load_truth(validation).ids
    assert not set(train_ids["tweet_id"]) & set(validation_ids["tweet_id"])
    assert set(validation_ids["user_id"]) & set(train_ids["user_id"])  # the same users, new impressions


# --- any schema

MADE_UP = [
    ("labels.custom_clicked", "int64_list", 1),
    ("u.emb", "float_list", 5),
    ("cont", "float_list", 9),
    ("unused.float", "float_list", 3),
    *[(t, "int64_list", 1) for t in TASKS],
    ("ids.user", "int64_list", 1),
    ("unused.token", "bytes_list", 2),
    ("a.emb", "float_list", 5),
    ("flags", "int64_list", 3),
    ("cats", "int64_list", 2),
    ("ids.tweet", "int64_list", 1),
    ("unused.int", "int64_list", 4),
]


def made_up(data: dict) -> None:
    renamed = {
        "continuous": "cont",
        "binary": "flags",
        "discrete": "cats",
        "user_embedding": "u.emb",
        "author_embedding": "a.emb",
        "meta__user_id": "ids.user",
        "meta__tweet_id": "ids.tweet",
    }
    for split in [data["train_data"], *data["validation_data"].values()]:
        split["seg_dense_schema"] = {**split["seg_dense_schema"], "renamed_features": renamed}
        split["tasks"] = {**split["tasks"], "labels.custom_clicked": {}}
    data["train_data"]["preprocess"] = {"truncate_and_slice": {"continuous_feature_truncation": 6}}


def test_any_schema_round_trips_through_the_decoder(tmp_path):
    config = write_config(tmp_path, made_up, MADE_UP)
    files = generate_for_config(config, examples=800, files=2, seed=1)
    assert len(files) == 6  # 2 files for each of the 3 splits
    train = [f for f in files if "/train/" in f]
    x = decode(train, config)
    truth = load_truth(train)
    n = len(truth)
    assert n == 800
    for name, dtype, length in MADE_UP:
        assert x[name].shape == (n, length), name
        assert (
            x[name].dtype == {"float_list": np.float32, "int64_list": np.int64, "bytes_list": object}[dtype]
        )
    assert np.array_equal(x["ids.user"][:, 0], truth.ids["user_id"])
    assert np.array_equal(x["ids.tweet"][:, 0], truth.ids["tweet_id"])
    for j, task in enumerate(truth.tasks):
        assert np.array_equal(x[task][:, 0], truth.true_labels[:, j]), task
    assert (
        "labels.custom_clicked" in truth.tasks
        and 0 < truth.probabilities(["labels.custom_clicked"]).mean() < 0.2
    )
    assert set(np.unique(x["flags"])) <= {0, 1} and set(np.unique(x["unused.int"])) <= {0, 1}


def test_signal_is_planted_in_kept_columns_only(tmp_path):
    config = write_config(tmp_path, made_up, MADE_UP)
    world = World(layout_for(config.train_data, config.validation_data), users=64, seed=0)
    planted = world.planted["continuous"]
    assert len(planted) == 6 and max(planted.values()) < 6  # truncation keeps 6 of the 9 columns
    assert len(world.planted["binary"]) == 3


# --- determinism


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    config = write_config(tmp_path)
    runs = [
        generate_for_config(config, out=str(tmp_path / name), examples=300, files=2, seed=seed)
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    ]
    for a, b, c in zip(*runs, strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
        assert Path(a).read_bytes() != Path(c).read_bytes()
        ta, tb = load_truth([a]), load_truth([b])
        assert np.array_equal(ta.true_probabilities, tb.true_probabilities)


# --- downsampling


def test_downsampled_split_keeps_rows_at_the_configured_rates(tmp_path):
    def plain(data):
        data["validation_data"] = {}

    def downsampled(data):
        plain(data)
        data["train_data"]["tasks"][FAV] = {"pos_downsampling_rate": 0.5, "neg_downsampling_rate": 0.1}

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    population, sample = write_config(tmp_path / "a", plain), write_config(tmp_path / "b", downsampled)
    all_rows = load_truth(generate_for_config(population, examples=8000, files=2, seed=5))
    kept_rows = load_truth(generate_for_config(sample, examples=8000, files=2, seed=5))
    # The same rows (impressions: user and tweet) are drawn; downsampling only drops some.
    survivors = set(zip(kept_rows.ids["user_id"].tolist(), kept_rows.ids["tweet_id"].tolist(), strict=True))
    kept = np.array(
        [
            pair in survivors
            for pair in zip(all_rows.ids["user_id"].tolist(), all_rows.ids["tweet_id"].tolist(), strict=True)
        ]
    )
    assert kept.sum() == len(kept_rows) < len(all_rows)
    fav = all_rows.labels([FAV])[:, 0] == 1
    for rows, rate in ((fav, 0.5), (~fav, 0.1)):
        n = rows.sum()
        assert abs(kept[rows].sum() - rate * n) <= 4.5 * np.sqrt(n * rate * (1 - rate)), rate
    # The weights (1 / rate) undo it: the weighted rate is the population's.
    y = kept_rows.labels([FAV])[:, 0]
    weighted = (y / 0.5).sum() / (y / 0.5 + (1 - y) / 0.1).sum()
    assert weighted == pytest.approx(fav.mean(), rel=0.25)


# --- where files go


def test_a_split_sharing_a_glob_is_written_once(tmp_path):
    def share(data):
        data["validation_data"]["validation"]["inputs"] = data["train_data"]["inputs"]
        del data["validation_data"]["validation_downsampled"]

    config = write_config(tmp_path, share)
    files = generate_for_config(config, examples=400, files=3, seed=0)
    assert files == select_files(config.validation_data["validation"]) == select_files(config.train_data)


def test_dated_inputs_get_a_folder_per_day_and_hour(tmp_path):
    def dated(data):
        data["train_data"].pop("inputs")
        data["train_data"]["explicit_date_inputs"] = {
            "data_root": str(tmp_path / "days"),
            "end_date": "2023-03-01",
            "days": 3,
        }
        data["validation_data"] = {
            "hourly": {
                **data["validation_data"]["validation"],
                "inputs": None,
                "explicit_datetime_inputs": {
                    "data_root": str(tmp_path / "hours"),
                    "end_datetime": "2023-03-01T01",
                    "hours": 2,
                },
            }
        }
        del data["validation_data"]["hourly"]["inputs"]

    config = write_config(tmp_path, dated)
    files = generate_for_config(config, examples=600, files=2, seed=0)
    days = {os.path.relpath(os.path.dirname(f), tmp_path / "days") for f in files if "/days/" in f}
    assert days == {"2023/02/27", "2023/02/28", "2023/03/01"}
    hours = {os.path.relpath(os.path.dirname(f), tmp_path / "hours") for f in files if "/hours/" in f}
    assert hours == {"2023/03/01/00", "2023/03/01/01"}
    assert sorted(f for f in files if "/days/" in f) == select_files(config.train_data)


def test_a_latest_split_is_written_to_end_at_this_hour_and_read_back(tmp_path):
    def latest(data):
        data["validation_data"]["validation"].pop("inputs")
        data["validation_data"]["validation"]["explicit_datetime_inputs"] = {
            "data_root": str(tmp_path / "holdout"),
            "end_datetime": "latest",
            "hours": 2,
        }

    before = datetime.now(UTC)
    config = write_config(tmp_path, latest)
    files = generate_for_config(config, examples=600, files=2, seed=0)
    after = datetime.now(UTC)
    held_out = sorted(f for f in files if "/holdout/" in f)
    newest = os.path.relpath(os.path.dirname(held_out[-1]), tmp_path / "holdout")
    assert newest in {before.strftime("%Y/%m/%d/%H"), after.strftime("%Y/%m/%d/%H")}
    assert select_files(config.validation_data["validation"]) == held_out


def test_out_writes_each_split_in_its_own_folder_and_regenerating_replaces(tmp_path):
    config = write_config(tmp_path)
    out = tmp_path / "elsewhere"
    generate_for_config(config, out=str(out), examples=300, files=3, seed=0)
    files = generate_for_config(config, out=str(out), examples=300, files=2, seed=0)
    assert sorted(glob.glob(str(out / "*" / "*.gz"))) == sorted(files)
    assert {Path(f).parent.name for f in files} == {"train", "validation", "validation_downsampled"}
    assert not (tmp_path / "data").exists()


def test_out_keeps_splits_that_share_inputs_together(tmp_path):
    def share(data):  # as in local_prod.yaml, where every split reads the training files
        data["train_data"]["inputs"] = str(tmp_path / "data" / "*" / "x" / "part-?.gz")
        data["validation_data"]["validation"]["inputs"] = data["train_data"]["inputs"]

    config = write_config(tmp_path, share)
    files = generate_for_config(config, out=str(tmp_path / "out"), examples=400, files=3, seed=0)
    assert {Path(f).parent.name for f in files} == {"train", "validation_downsampled"}
    assert len([f for f in files if "/train/" in f]) == 3


def test_cli_generates(tmp_path, capsys):
    config = write_config(tmp_path)
    path = tmp_path / "config.yaml"
    assert main(["data", "generate", "--config", str(path), "--examples", "200", "--files", "1"]) == 0
    assert len(select_files(config.train_data)) == 1


# --- errors a person can make


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("data/*/x/*.gz", "has a wildcard"),
        ("data/[ab].gz", r"cannot name data files that '\[ab\].gz' matches"),
        ("data/*", "truth sidecars"),
    ],
)
def test_unusable_globs_are_refused_naming_the_field(tmp_path, inputs, message):
    def glob_(data):
        data["train_data"]["inputs"] = str(tmp_path / inputs)

    config = write_config(tmp_path, glob_)
    with pytest.raises(UserError, match=message) as info:
        generate_for_config(config, examples=100, files=1, seed=0)
    assert "train_data.inputs" in str(info.value)


def test_files_not_written_by_the_generator_are_left_alone(tmp_path):
    config = write_config(tmp_path)
    stray = tmp_path / "data" / "validation" / "real.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"precious")
    with pytest.raises(UserError, match="real.gz was not written by"):
        generate_for_config(config, examples=100, files=1, seed=0)
    assert stray.read_bytes() == b"precious"


def test_bad_sizes_and_mixed_schemas_are_refused(tmp_path):
    config = write_config(tmp_path)
    with pytest.raises(UserError, match="must be positive"):
        generate_for_config(config, examples=0)
    with pytest.raises(
        UserError, match=r"files per split \(101\) must not exceed the train split's rows \(100\)"
    ):
        generate_for_config(config, examples=100, files=101)
    # a world of 10**14 users: beyond any address space, so refused at once even where memory is
    # overcommitted; said in one line
    with pytest.raises(
        UserError, match="out of memory generating 1,000,000,000,000,000 rows; lower --examples"
    ):
        generate_for_config(config, examples=10**15)
    assert not (tmp_path / "data").exists()  # nothing written

    def other_schema(data):
        other = tmp_path / "other.json"
        other.write_text((CONFIGS / "segdense_small.json").read_text())
        data["validation_data"]["validation"]["seg_dense_schema"] = {
            **data["validation_data"]["validation"]["seg_dense_schema"],
            "schema_path": str(other),
        }

    with pytest.raises(UserError, match="validation_data.validation.seg_dense_schema.schema_path"):
        generate_for_config(write_config(tmp_path, other_schema), examples=100)


# --- the truth sidecar


def test_truth_sidecar_errors_name_the_file_and_the_task(tmp_path):
    config = write_config(tmp_path)
    files = generate_for_config(config, examples=200, files=2, seed=0)
    assert truth_path(files[0]) == files[0][: -len(".gz")] + ".truth.npz"
    with pytest.raises(DataError, match="no task nope"):
        load_truth(files[:1]).probabilities(["nope"])
    os.remove(truth_path(files[1]))
    with pytest.raises(DataError, match=f"{files[1]}: no truth sidecar"):
        load_truth(files[:2])
    Path(truth_path(files[1])).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a truth sidecar"):
        load_truth(files[:2])
