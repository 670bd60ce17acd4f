"""export --precision: bf16 (pt2) and int8 (ONNX) programs, the manifest and the server that report their
precision, the formats each refuses, and int8's drift from fp32 held to what bench/precision_quality.py
measured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import torch

from heavyranker.cpu import CpuInfo
from heavyranker.errors import SettingError
from heavyranker.eval.metrics import rce
from heavyranker.serve import precision as precision_module
from heavyranker.serve.app import create_app
from heavyranker.serve.export import export_model
from heavyranker.serve.predict import predict_files
from heavyranker.serve.scorer import Scorer
from tests.serve.conftest import SHAPES, Exported, random_features, serving
from tests.serve.test_app import body, post

# Measured int8 against fp32 (max and mean |probability difference|): on the demo model (local_small, 3000
# steps) over its validation split (bench/precision_quality.py, bench/results/precision_quality.json)
# 2.8e-2 and 3.1e-4; on this module's model (initial weights) and features 1.3e-2 and 1.7e-3. The bounds
# leave that 1.5x room: a quantization that loses more (activations in int8 with a fixed range, the score's
# product quantized) breaks them.
INT8_MAX_DRIFT = 4e-2
INT8_MEAN_DRIFT = 2.5e-3
INT8_RCE_DRIFT = 0.5  # points, on tasks of the test split with >= 50 positives


@pytest.fixture(scope="module")
def folders(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    exports = {"fp32": "onnx", "bf16": "pt2", "int8": "onnx"}
    return {
        precision: export_model(
            exported.config,
            checkpoint=str(exported.checkpoint),
            out=str(root / precision),
            format=format,
            precision=precision,
        )
        for precision, format in exports.items()
    }


def _features(n: int, seed: int) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(v) for name, v in random_features(SHAPES, n, seed).items()}


def test_each_export_records_and_reports_its_precision(folders: dict[str, Path]):
    for precision, folder in folders.items():
        scorer = Scorer(folder)
        assert scorer.manifest["precision"] == scorer.precision == precision


def test_int8_quantizes_the_dense_layers_and_keeps_the_score_in_fp32(folders: dict[str, Path]):
    nodes = onnx.load(folders["int8"] / "model.onnx").graph.node
    kinds = [n.op_type for n in nodes]
    assert kinds.count("DynamicQuantizeMatMul") + kinds.count("MatMulInteger") >= 8  # local_small's layers
    assert "MatMul" in kinds  # probabilities @ engagement weights
    fp32 = onnx.load(folders["fp32"] / "model.onnx").graph.initializer
    int8 = onnx.load(folders["int8"] / "model.onnx").graph.initializer
    assert any(t.data_type == onnx.TensorProto.INT8 for t in int8)
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in fp32) == 0


def test_bf16_stores_the_dense_weights_in_bf16_and_scores_close_to_fp32(folders: dict[str, Path]):
    program = torch.export.load(str(folders["bf16"] / "model.pt2"))
    dtypes = {t.dtype for t in program.state_dict.values()}
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # dense weights; norms, logit layers
    features = _features(200, seed=3)
    (p_fp32, _), (p_bf16, s_bf16) = Scorer(folders["fp32"])(features), Scorer(folders["bf16"])(features)
    assert p_bf16.dtype == s_bf16.dtype == torch.float32
    # bf16 keeps 8 bits of each weight and activation: probabilities move in their third digit, not more.
    assert 0 < float((p_bf16 - p_fp32).abs().max()) < 2e-2


def _readers(node: torch.fx.Node) -> Iterator[torch.fx.Node]:
    """The nodes that read `node`'s value, through casts to bf16 of a bf16 value (no-ops when run) and past
    the exporter's metadata checks."""
    for user in node.users:
        if user.target == torch.ops.aten.to.dtype and user.args[1] == torch.bfloat16:
            yield from _readers(user)
        elif user.target != torch.ops.aten._assert_tensor_metadata.default:
            yield user


def test_the_bf16_program_gates_in_bf16_casts_each_tensor_once_and_normalizes_in_fp32(
    folders: dict[str, Path],
):
    graph = torch.export.load(str(folders["bf16"] / "model.pt2")).graph
    ops = torch.ops.aten

    def dtypes(node: torch.fx.Node) -> list[torch.dtype]:
        return [a.meta["val"].dtype for a in node.args if isinstance(a, torch.fx.Node)]

    # local_small's two mask blocks: x times the mask, both bf16, read by the hidden layer as it is
    gates = [n for n in graph.nodes if n.target == ops.mul.Tensor and dtypes(n) == [torch.bfloat16] * 2]
    assert len(gates) == 2
    assert all(user.target == ops.linear.default for gate in gates for user in _readers(gate))
    # the mask blocks read one input, the towers another: each cast to bf16 once
    casts = [(n.args[0], n.args[1]) for n in graph.nodes if n.target == ops.to.dtype]
    assert len(casts) > 2 and len(casts) == len(set(casts))
    norms = [n for n in graph.nodes if n.target in (ops.layer_norm.default, ops.batch_norm.default)]
    assert norms and all(dtypes(n)[0] == torch.float32 for n in norms)


@pytest.mark.parametrize(
    "precision, format, message",
    [
        ("bf16", "onnx", "precision bf16 with format onnx: onnxruntime's CPU provider has no bf16 MatMul"),
        (
            "int8",
            "pt2",
            "precision int8 with format pt2: torch's dynamic quantization (torch.ao) is deprecated",
        ),
        ("fp16", "onnx", "precision fp16: not one of fp32, bf16, int8"),
    ],
)
def test_a_precision_the_format_cannot_run_is_one_line_naming_the_other(
    exported: Exported, tmp_path, precision, format, message
):
    with pytest.raises(SettingError) as error:
        export_model(
            exported.config,
            checkpoint=str(exported.checkpoint),
            out=str(tmp_path),
            format=format,
            precision=precision,
        )
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_serve_runs_each_precision_and_reports_it_on_v1_and_v2(folders: dict[str, Path], precision: str):
    app = create_app(folders[precision], model_name="ranker", max_candidates=50)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/model").json()["precision"] == precision
        assert http.get("/v2/models/ranker").json()["parameters"]["precision"] == precision
        ranked = post(http, body(5))
        assert ranked.status_code == 200 and len(ranked.json()["candidates"]) == 5


@pytest.mark.parametrize(
    "flags, warned",
    [({"avx512f", "avx512_bf16"}, True), ({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}, False)],
)
def test_a_bf16_model_on_an_intel_cpu_without_amx_warns_once_per_process(
    folders: dict[str, Path], records, tmp_path, monkeypatch, caplog, flags: set[str], warned: bool
):
    """Served or predicted: one line, at the first bf16 load of the process; fp32 and int8 never warn."""
    cpu = CpuInfo("Fake Xeon", "GenuineIntel", frozenset(flags))
    monkeypatch.setattr(precision_module, "cpu_info", lambda: cpu)
    precision_module._warn_slow_bf16.cache_clear()  # a warning given earlier in this process is not one here
    with caplog.at_level("WARNING"):
        for precision in ("fp32", "int8", "bf16", "bf16"):
            create_app(folders[precision], model_name="ranker", max_candidates=50)
        precision_module._warn_slow_bf16.cache_clear()  # predict, in a process of its own
        predict_files(
            model_dir=str(folders["bf16"]), inputs=str(records[0] / "*.gz"), out=str(tmp_path / "p.csv")
        )
    lines = [r.getMessage() for r in caplog.records if "Fake Xeon" in r.getMessage()]
    assert lines == (
        [
            "a bf16 model (export --precision bf16) on Fake Xeon, an Intel CPU with avx512_bf16 but no "
            "amx_bf16: its bf16 products are slower than fp32 ones (0.56x on a Xeon of this kind); bf16 "
            "pays with AMX (docs/precision.md)"
        ]
        * 2
        if warned
        else []
    )
    precision_module._warn_slow_bf16.cache_clear()


def test_int8_drift_from_fp32_stays_within_the_measured_bound(folders: dict[str, Path]):
    features = _features(2000, seed=5)
    p_fp32, _ = Scorer(folders["fp32"])(features)
    p_int8, _ = Scorer(folders["int8"])(features)
    drift = (p_int8 - p_fp32).abs()
    assert float(drift.max()) <= INT8_MAX_DRIFT and float(drift.mean()) <= INT8_MEAN_DRIFT
    # Labels drawn from the fp32 model's own probabilities: RCE as the quality measure sees it.
    labels = (torch.rand(p_fp32.shape, generator=torch.Generator().manual_seed(0)) < p_fp32).float()
    ones = np.ones(len(labels))
    for j in range(labels.shape[1]):
        if labels[:, j].sum() >= 50:
            drift = rce(labels[:, j], p_int8[:, j], ones) - rce(labels[:, j], p_fp32[:, j], ones)
            assert abs(drift) <= INT8_RCE_DRIFT, j
