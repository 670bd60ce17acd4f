"""export --table-precision int8: the id tables' rows in FBGEMM's row-wise 8-bit layout against a numpy
reference, the exported programs (ONNX and pt2; range, hash and managed tables) against the eager model with
the same rows and, within a bound derived from the rows' rounding, against the fp32 model; a quarter of the
tables' bytes; the precision in the manifest, /v1/model and the /v2 metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx.numpy_helper import to_array

from heavyranker.checkpoint import save_checkpoint
from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.errors import SettingError, UserError
from heavyranker.model import build_model
from heavyranker.serve.app import client_manifest
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import Scorer
from heavyranker.serve.table_precision import Int8Rows, quantize_rows, with_int8_tables
from heavyranker.serve.v2 import model_metadata
from tests.conftest import CONFIGS
from tests.serve.conftest import random_features

DIM = 8
TABLES = [
    "model.large_embeddings={tables: ["
    f"{{name: lists, num_embeddings: 300, embedding_dim: {DIM}, feature_name: discrete, id_mapping: hash, "
    "num_hashes: 2},"
    f"{{name: users, num_embeddings: 16, embedding_dim: {DIM}, feature_name: meta__user_id, "
    "id_mapping: managed},"
    f"{{name: authors, num_embeddings: 400, embedding_dim: {DIM}, feature_name: meta__author_id}}]}}",
    "model.small_embeddings={tables: "
    f"[{{name: column, num_embeddings: 10, embedding_dim: {DIM}, index: 3}}]}}",
]
USERS = [2**63 - 1, -(2**63), -12345, 1_234_567_890_123]


def reference_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row by row, as FBGEMM's 8-bit row-wise layout is described: the bias is the largest fp16 at most the
    row's minimum, the scale the smallest fp16 at least (max - bias) / 255, the codes the nearest integer of
    (x - bias) / scale (fp32 arithmetic)."""
    codes, scales, biases = [], [], []
    for row in weight.astype(np.float32):
        bias = np.float16(row.min())
        if np.float32(bias) > row.min():
            bias = np.nextafter(bias, np.float16(-np.inf))
        wanted = (row.max() - np.float32(bias)) / np.float32(255)
        scale = np.float16(wanted)
        if np.float32(scale) < wanted:
            scale = np.nextafter(scale, np.float16(np.inf))
        step = np.float32(scale) if scale > 0 else np.float32(1)
        codes.append(np.clip(np.rint((row - np.float32(bias)) / step), 0, 255).astype(np.uint8))
        scales.append(scale)
        biases.append(bias)
    return np.stack(codes), np.array(scales, np.float16), np.array(biases, np.float16)


def test_rows_are_fbgemm_rowwise_int8_and_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 16, generator=gen) * 0.3
    weight[1] = 0.25  # a constant row: its bias holds it exactly
    weight[2] += 7.0  # far from 0: the bias, not the scale, carries the offset
    weight[3] *= 1e-5  # a tiny range: the scale close to fp16's smallest
    codes, scale_bias = quantize_rows(weight, "t")
    ref_codes, ref_scales, ref_biases = reference_rows(weight.numpy())
    np.testing.assert_array_equal(codes.numpy(), ref_codes)
    np.testing.assert_array_equal(scale_bias[:, 0].numpy(), ref_scales)
    np.testing.assert_array_equal(scale_bias[:, 1].numpy(), ref_biases)
    assert codes.dtype == torch.uint8 and scale_bias.dtype == torch.float16
    dequantized = Int8Rows(weight, "t").dequantized()
    assert torch.equal(dequantized[1], weight[1])
    step = scale_bias[:, :1].float()
    assert bool(((dequantized - weight).abs() <= step / 2 + 1e-6 * weight.abs()).all())
    # The largest value of a row takes the largest code, unless its scale is below fp16's normal numbers
    # (row 3: a subnormal scale rounds up by more than a code's width) or 0 (row 1).
    spread = [r for r in range(200) if r not in (1, 3)]
    assert bool(codes[spread].max(dim=1).values.eq(255).all())


def test_a_row_fp16_cannot_hold_is_refused_in_one_line():
    weight = torch.zeros(3, 4)
    weight[2, 1] = float("inf")
    with pytest.raises(UserError, match="table users: .*--table-precision fp32"):
        quantize_rows(weight, "users")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """local_small with a hashed, a managed and a range large table and a small range table; the managed
    table has admitted USERS. The model (eval) and its checkpoint."""
    config = load_config(CONFIGS / "local_small.yaml", TABLES)
    torch.manual_seed(0)
    specs = feature_specs(config.train_data)
    model = build_model(config.model, specs, config.train_data.tasks)
    shapes = {name: spec.shape for name, spec in specs.items()}
    features = {k: torch.from_numpy(v) for k, v in random_features(shapes, 4, seed=0).items()}
    features["meta__user_id"] = torch.tensor(USERS)
    model(features)
    model.eval()
    folder = tmp_path_factory.mktemp("int8_tables")
    checkpoint = save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0})
    return config, model, checkpoint, shapes


def features_with_ids(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, torch.Tensor]:
    features = random_features(shapes, n, seed=n)
    rng = np.random.default_rng(n)
    features["discrete"] = rng.integers(-(2**40), 2**40, (n, 8), dtype=np.int64)
    features["discrete"][:, 3] = rng.integers(-2, 12, n)  # the small table's column: in range and out
    features["discrete"][0] = -1
    features["meta__user_id"] = np.array([[*USERS, 7][i % 5] for i in range(n)], dtype=np.int64)
    features["meta__author_id"] = rng.integers(-50, 450, n)  # the range table: in range and out
    return {k: torch.from_numpy(v) for k, v in features.items()}


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_exported_int8_tables_score_as_the_eager_model_with_the_same_rows(trained, tmp_path, format):
    config, model, checkpoint, shapes = trained
    folder = export_model(
        config, checkpoint=str(checkpoint), out=str(tmp_path), format=format, table_precision="int8"
    )
    scorer = Scorer(folder)
    assert scorer.table_precision == scorer.manifest["table_precision"] == "int8"
    assert client_manifest(scorer.manifest)["table_precision"] == "int8"
    assert model_metadata(scorer, "m")["parameters"]["table_precision"] == "int8"
    quantized = with_int8_tables(model)
    features = features_with_ids(shapes, 23)
    with torch.no_grad():
        eager = quantized(features)["calibrated_probabilities"]
        fp32 = model(features)["calibrated_probabilities"]
    probabilities, _ = scorer(features)
    torch.testing.assert_close(probabilities, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(probabilities, fp32)  # the rows are the 8-bit ones


def test_programs_hold_the_tables_in_8_bits_at_a_quarter_of_their_bytes(trained, tmp_path):
    config, model, checkpoint, _ = trained
    folders = {
        (p, f): export_model(
            config, checkpoint=str(checkpoint), out=str(tmp_path / p / f), format=f, table_precision=p
        )
        for p in ("fp32", "int8")
        for f in ("onnx", "pt2")
    }
    tables = {**model.large_embeddings, **model.small_embeddings}
    rows = sorted(t.embedding.weight.shape[0] for t in tables.values())
    fp32_bytes, int8_bytes = (
        json.loads((folders[p, "onnx"] / "manifest.json").read_text())["table_bytes"]
        for p in ("fp32", "int8")
    )
    assert fp32_bytes == 4 * DIM * sum(rows)
    assert int8_bytes == (DIM + 4) * sum(rows)  # (D + 4) / 4D of fp32: 0.375 at D = 8, 0.27 at D = 64
    onnx_tensors = {
        p: onnx.load(folders[p, "onnx"] / "model.onnx").graph.initializer for p in ("fp32", "int8")
    }
    found = {  # the tables' codes and scales, by their rows
        kind: sorted(
            int(t.dims[0]) for t in onnx_tensors["int8"] if t.data_type == kind and t.dims[1:] == [width]
        )
        for kind, width in ((onnx.TensorProto.UINT8, DIM), (onnx.TensorProto.FLOAT16, 2))
    }
    assert found == {onnx.TensorProto.UINT8: rows, onnx.TensorProto.FLOAT16: rows}
    eight_bit = (onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16)
    assert sum(to_array(t).nbytes for t in onnx_tensors["int8"] if t.data_type in eight_bit) == int8_bytes
    assert not any(t.data_type in eight_bit for t in onnx_tensors["fp32"])
    pt2 = torch.export.load(str(folders["int8", "pt2"] / "model.pt2"))
    held = [*pt2.state_dict.values(), *pt2.constants.values()]
    assert sum(t.nbytes for t in held if t.dtype in (torch.uint8, torch.float16)) == int8_bytes


def test_unknown_table_precision_is_a_one_line_error(trained, tmp_path):
    config, _, checkpoint, _ = trained
    with pytest.raises(SettingError, match="table_precision int4: not one of fp32, int8"):
        export_model(config, checkpoint=str(checkpoint), out=str(tmp_path), table_precision="int4")


@pytest.mark.parametrize("format", ["onnx", "pt2"])
def test_int8_tables_move_the_scores_within_the_bound_their_rounding_gives(tmp_path, format):
    """Towers of one linear layer over the input, no backbone: a table's vector moves by at most the
    rounding of its rows, e = max scale / 2 per value (times k for an id's k hashed rows summed, which the
    bag mean over ids does not raise); a task's logit by at most sum over tables of e * |its weights on the
    table's slice|, its probability by at most a quarter of that (the sigmoid's slope), the score by the
    engagement weights' sum of that."""
    base = load_config(CONFIGS / "local_small.yaml", TABLES)
    linear = [f"model.tasks.{task}={{mlp_config: {{layer_sizes: [1]}}}}" for task in base.model.tasks]
    config = load_config(
        CONFIGS / "local_small.yaml",
        [*TABLES, "model.multi_task_type=share_none", "model.backbone=null", *linear],
    )
    torch.manual_seed(1)
    specs = feature_specs(config.train_data)
    model = build_model(config.model, specs, config.train_data.tasks)
    shapes = {name: spec.shape for name, spec in specs.items()}
    model(features_with_ids(shapes, 8))  # admits users to the managed table
    model.eval()
    assert bool((model.calibration_ratios == 1).all())  # calibration is the identity here
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 0, {"model": model.state_dict(), "step": 0})
    folder = export_model(
        config, checkpoint=str(checkpoint), out=str(tmp_path / "m"), format=format, table_precision="int8"
    )
    start, rounding = model.featurizer.out_features, []  # (first column, width, e) per table
    for table in [*model.large_embeddings.values(), *model.small_embeddings.values()]:
        _, scale_bias = quantize_rows(table.embedding.weight, "t")
        hashes = 1 if table.mean else table.mapping.num_hashes
        rounding.append((start, DIM, hashes * float(scale_bias[:, 0].float().max()) / 2))
        start += DIM
    tower_weights = [tower.layers[0].weight.detach()[0] for tower in model.towers.values()]  # [input width]
    logit_bound = torch.stack(
        [sum(e * w[a : a + n].abs().sum() for a, n, e in rounding) for w in tower_weights]
    )
    probability_bound = logit_bound / 4 + 1e-6
    weights = torch.tensor([config.engagement_weights.get(t, 0.0) for t in config.task_names])
    features = features_with_ids(shapes, 64)
    with torch.no_grad():
        eager = model(features)["calibrated_probabilities"]
    probabilities, score = Scorer(folder)(features)
    moved = (probabilities - eager).abs()
    assert bool((moved <= probability_bound).all())
    assert bool(((score - eager @ weights).abs() <= probability_bound @ weights.abs() + 1e-5).all())
    assert float(moved.max()) > 0  # the rows were rounded


def test_the_export_command_takes_the_table_precision(trained, tmp_path):
    _, _, checkpoint, _ = trained
    arguments = ["export", "--config", str(CONFIGS / "local_small.yaml"), "--checkpoint", str(checkpoint)]
    arguments += [a for value in TABLES for a in ("--set", value)]
    assert main([*arguments, "--out", str(tmp_path), "--format", "pt2", "--table-precision", "int8"]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["table_precision"] == "int8"
