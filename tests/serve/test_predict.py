"""`heavyranker predict` on a small TFRecord file written here without labels, and on the same rows as
Parquet: ids, columns, probabilities against the eager model, the score against the weights, Parquet and CSV
out, one row group per batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import torch

from heavyranker.cli import main
from heavyranker.data.convert import convert_files
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.tf_example import encode_example
from heavyranker.errors import UserError
from heavyranker.serve.predict import predict_files
from tests.data.test_damaged_records import small_rows
from tests.serve.conftest import UNLABELLED_EXAMPLES as EXAMPLES
from tests.serve.conftest import Exported, score_tolerance

BATCH = 16


def _predict(exported: Exported, inputs: Path, out: Path, **kwargs) -> int:
    return predict_files(model_dir=str(exported.folder), inputs=str(inputs), out=str(out), **kwargs)


def _expected(exported: Exported, features: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        out = exported.model({name: torch.from_numpy(values) for name, values in features.items()})
    return out["calibrated_probabilities"].numpy()


def test_parquet_rows_hold_ids_probabilities_and_the_weighted_score(exported: Exported, records, tmp_path):
    folder, features = records
    out = tmp_path / "scores.parquet"
    assert _predict(exported, folder / "*.gz", out, batch_size=BATCH) == EXAMPLES
    tasks = exported.config.task_names
    table = pq.read_table(out)
    assert table.column_names == ["user_id", "tweet_id", "author_id", *tasks, "score"]
    for column in ("user_id", "tweet_id", "author_id"):  # one file, read in order
        np.testing.assert_array_equal(table[column].to_numpy(), features[f"meta__{column}"])
    probabilities = np.stack([table[t].to_numpy() for t in tasks], axis=1)
    np.testing.assert_allclose(probabilities, _expected(exported, features), rtol=1e-5, atol=1e-5)
    weights = exported.config.engagement_weights
    by_hand = sum(weights[t] * table[t].to_numpy().astype(np.float64) for t in tasks)
    np.testing.assert_allclose(table["score"].to_numpy(), by_hand, rtol=1e-5, atol=1e-4)
    assert pq.ParquetFile(out).num_row_groups == -(-EXAMPLES // BATCH)  # written batch by batch
    assert [p.name for p in tmp_path.iterdir()] == ["scores.parquet"]  # no temporary file left


def test_parquet_files_score_as_the_same_records_in_tfrecord(exported: Exported, records, tmp_path):
    folder, _ = records
    convert_files(
        exported.config.train_data, to="parquet", out=str(tmp_path / "rows"), inputs=str(folder / "*.gz")
    )
    assert _predict(exported, folder / "*.gz", tmp_path / "from_tfrecord.parquet") == EXAMPLES
    assert _predict(exported, tmp_path / "rows" / "*.parquet", tmp_path / "from_parquet.parquet") == EXAMPLES
    assert pq.read_table(tmp_path / "from_parquet.parquet").equals(
        pq.read_table(tmp_path / "from_tfrecord.parquet")
    )


def test_csv_through_the_command_line_matches_parquet(exported: Exported, records, tmp_path):
    folder, _ = records
    common = ["--model", str(exported.folder), "--inputs", str(folder / "*.gz"), "--batch-size", str(BATCH)]
    assert main(["predict", *common, "--out", str(tmp_path / "scores.csv")]) == 0
    assert main(["predict", *common, "--out", str(tmp_path / "scores.parquet")]) == 0
    csv, parquet = pa_csv.read_csv(tmp_path / "scores.csv"), pq.read_table(tmp_path / "scores.parquet")
    assert csv.column_names == parquet.column_names
    for name in csv.column_names:
        np.testing.assert_allclose(csv[name].to_numpy(), parquet[name].to_numpy(), rtol=1e-7)


def test_an_onnx_export_predicts_the_scores_of_the_pt2_export(
    exported: Exported, exported_onnx: Path, records, tmp_path
):
    folder, _ = records
    pt2, ort = tmp_path / "pt2.parquet", tmp_path / "onnx.parquet"
    _predict(exported, folder / "*.gz", pt2, batch_size=BATCH)
    predict_files(model_dir=str(exported_onnx), inputs=str(folder / "*.gz"), out=str(ort), batch_size=BATCH)
    a, b = pq.read_table(pt2), pq.read_table(ort)
    assert a.column_names == b.column_names
    for column in ("user_id", "tweet_id", "author_id"):
        np.testing.assert_array_equal(b[column].to_numpy(), a[column].to_numpy())
    for task in exported.config.task_names:
        np.testing.assert_allclose(b[task].to_numpy(), a[task].to_numpy(), rtol=0, atol=1e-5)
    tolerance = score_tolerance(exported.config.engagement_weights)
    np.testing.assert_allclose(b["score"].to_numpy(), a["score"].to_numpy(), rtol=0, atol=tolerance)


def test_predict_logs_the_defaults_it_filled(exported: Exported, tmp_path, caplog):
    rows = small_rows(10)
    for row in rows[3:5]:
        del row["meta.user_id"]
    write_records(str(tmp_path / "part-0.gz"), [encode_example(row) for row in rows])
    with caplog.at_level("INFO"):
        assert _predict(exported, tmp_path / "*.gz", tmp_path / "scores.csv") == 10
    counts = "defaults_filled=2 (meta.user_id=2), damaged_files=0, skipped_records=0"
    assert f"{tmp_path / '*.gz'}: {counts}" in caplog.messages


def test_the_out_folder_is_made_and_a_file_in_its_way_is_one_line_naming_it(
    exported: Exported, records, tmp_path, capsys
):
    folder, _ = records
    common = ["predict", "--model", str(exported.folder), "--inputs", str(folder / "*.gz")]
    assert main([*common, "--out", str(tmp_path / "new" / "scores.csv")]) == 0
    assert pa_csv.read_csv(tmp_path / "new" / "scores.csv").num_rows == EXAMPLES
    capsys.readouterr()  # the progress bar
    (tmp_path / "a-file").write_text("")
    assert main([*common, "--out", str(tmp_path / "a-file" / "scores.csv")]) == 2
    assert capsys.readouterr().err == (
        f"error: predict: --out {tmp_path / 'a-file' / 'scores.csv'}: cannot create its folder: File exists\n"
    )


def test_an_unknown_extension_is_refused(exported: Exported, records, tmp_path):
    folder, _ = records
    with pytest.raises(UserError, match=r"^out .*scores\.json: the extension says the format"):
        _predict(exported, folder / "*.gz", tmp_path / "scores.json")


def test_no_matching_files_is_an_error(exported: Exported, tmp_path):
    with pytest.raises(UserError, match="no files match inputs"):
        _predict(exported, tmp_path / "*.gz", tmp_path / "s.csv")


def test_a_damaged_file_names_itself_and_leaves_no_output(exported: Exported, records, tmp_path):
    folder, _ = records
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes((folder / "part-0.gz").read_bytes()[:-100])
    with pytest.raises(UserError, match="damaged.gz"):
        _predict(exported, damaged, tmp_path / "s.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["damaged.gz"]


@pytest.mark.parametrize("damage", ["missing", "broken"])
def test_a_bad_schema_in_the_model_folder_is_one_line_and_exit_2(
    exported: Exported, records, tmp_path, capsys, damage
):
    """predict reads the schema copied into the model folder, with no config to check it beforehand."""
    model = shutil.copytree(exported.folder, tmp_path / "model")
    if damage == "missing":
        (model / "schema.json").unlink()
    else:
        (model / "schema.json").write_text('{"schema": [{"feature_name": "x"}]}')
    inputs = str(records[0] / "*.gz")
    assert main(["predict", "--model", str(model), "--inputs", inputs, "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(model / "schema.json") in err


@pytest.mark.parametrize("key", ["config", "schema"])
def test_a_manifest_without_the_data_settings_is_one_line_and_exit_2(
    exported: Exported, records, tmp_path, capsys, key
):
    # Serving needs neither: Scorer loads such a folder, and predict failed with a KeyError traceback.
    model = shutil.copytree(exported.folder, tmp_path / "model")
    manifest = json.loads((model / "manifest.json").read_text())
    del manifest[key]
    (model / "manifest.json").write_text(json.dumps(manifest))
    inputs = str(records[0] / "*.gz")
    assert main(["predict", "--model", str(model), "--inputs", inputs, "--out", str(tmp_path / "s.csv")]) == 2
    assert capsys.readouterr().err == (
        f"error: {model / 'manifest.json'}: no config.train_data and schema to read the data with "
        f"(KeyError: '{key}'): export the model again\n"
    )
