"""The ONNX export: onnxruntime on model.onnx gives the eager model's outputs at any batch size, its inputs
and outputs are those the manifest names, its graph is standard ONNX with plain products, Triton's config
describes it, and the Scorer runs it as it runs a torch.export program."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from heavyranker.cli import main
from heavyranker.config import load_config
from heavyranker.errors import UserError
from heavyranker.model.linear import HAS_ONEDNN, MIN_WEIGHTS
from heavyranker.serve.app import create_app
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import Scorer
from tests.conftest import CONFIGS
from tests.serve.conftest import OVERRIDES, Exported, random_features, score_tolerance, serving

ONNX_TYPES = {"float32": "tensor(float)"}  # local_small's inputs


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _shapes(manifest: dict) -> dict[str, tuple[int, ...]]:
    return {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}


def test_onnxruntime_gives_the_eager_outputs_at_two_batch_sizes(exported: Exported, exported_onnx: Path):
    manifest = _manifest(exported_onnx)
    session = onnxruntime.InferenceSession(str(exported_onnx / "model.onnx"))
    weights = np.array([manifest["engagement_weights"][t] for t in manifest["tasks"]])
    for n in (3, 300):
        features = random_features(_shapes(manifest), n, seed=n)  # NaN and inf among the continuous values
        assert not np.isfinite(features["continuous"]).all()
        probabilities, score = session.run(["probabilities", "score"], features)
        with torch.no_grad():
            eager = exported.model({k: torch.from_numpy(v) for k, v in features.items()})
        expected = eager["calibrated_probabilities"].double().numpy()
        assert probabilities.shape == (n, len(manifest["tasks"])) and score.shape == (n,)
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
        tolerance = score_tolerance(manifest["engagement_weights"])
        np.testing.assert_allclose(score, expected @ weights, rtol=0, atol=tolerance)
        assert np.isfinite(probabilities).all() and np.isfinite(score).all()


def test_inputs_and_outputs_are_named_and_typed_as_the_manifest_says(exported_onnx: Path):
    manifest = _manifest(exported_onnx)
    session = onnxruntime.InferenceSession(str(exported_onnx / "model.onnx"))
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    assert inputs == [
        (i["name"], ONNX_TYPES[i["dtype"]], ["candidates", *i["shape"]]) for i in manifest["inputs"]
    ]
    outputs = [(o.name, o.type, o.shape) for o in session.get_outputs()]
    assert outputs == [
        ("probabilities", "tensor(float)", ["candidates", len(manifest["tasks"])]),
        ("score", "tensor(float)", ["candidates"]),
    ]
    assert {name: o["dtype"] for name, o in manifest["outputs"].items()} == {
        "probabilities": "float32",
        "score": "float32",
    }


def test_the_graph_is_standard_onnx_with_one_gemm_per_linear_layer(exported: Exported, exported_onnx: Path):
    """A layer that runs on oneDNN in the eager model is a plain Gemm in the graph, as every other one."""
    graph = onnx.load(exported_onnx / "model.onnx").graph
    assert {node.domain for node in graph.node} == {""}
    linears = [m for m in exported.model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(node.op_type == "Gemm" for node in graph.node) == len(linears)
    if HAS_ONEDNN:
        assert any(m.matmul == "onednn" and m.weight.numel() >= MIN_WEIGHTS for m in linears)


def test_the_manifest_names_the_onnx_program(exported: Exported, exported_onnx: Path):
    onnx_manifest, pt2_manifest = _manifest(exported_onnx), _manifest(exported.folder)
    model = onnx.load(exported_onnx / "model.onnx")
    assert onnx_manifest["program_format"] == "onnx" and onnx_manifest["program"] == "model.onnx"
    assert onnx_manifest["onnx_opset"] == next(o.version for o in model.opset_import if o.domain == "")
    program = (exported_onnx / "model.onnx").read_bytes()
    assert onnx_manifest["program_sha256"] == hashlib.sha256(program).hexdigest()
    program_keys = {"program_format", "program", "program_sha256", "onnx_opset"}
    assert {k: v for k, v in onnx_manifest.items() if k not in program_keys} == {
        k: v for k, v in pt2_manifest.items() if k not in program_keys
    }
    assert sorted(p.name for p in exported_onnx.iterdir()) == [
        "config.pbtxt",
        "manifest.json",
        "model.onnx",
        "schema.json",
    ]


def test_the_triton_config_describes_the_model(exported_onnx: Path):
    """local_small's inputs, batched along the candidates; the score is one value per candidate."""
    assert (exported_onnx / "config.pbtxt").read_text() == (
        'platform: "onnxruntime_onnx"\n'
        "max_batch_size: 2048\n"
        "input [\n"
        '  { name: "continuous" data_type: TYPE_FP32 dims: [ 48 ] },\n'
        '  { name: "binary" data_type: TYPE_FP32 dims: [ 16 ] },\n'
        '  { name: "user_embedding" data_type: TYPE_FP32 dims: [ 16 ] },\n'
        '  { name: "user_eng_embedding" data_type: TYPE_FP32 dims: [ 16 ] },\n'
        '  { name: "author_embedding" data_type: TYPE_FP32 dims: [ 16 ] }\n'
        "]\n"
        "output [\n"
        '  { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] },\n'
        '  { name: "score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [ ] } }\n'
        "]\n"
        "dynamic_batching { }\n"
    )


def test_the_scorer_runs_either_program_with_the_same_results(exported: Exported, exported_onnx: Path):
    pt2, ort = Scorer(exported.folder), Scorer(exported_onnx, threads=2)
    options = ort.program.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert (ort.tasks, ort.inputs) == (pt2.tasks, pt2.inputs)
    features = {k: torch.from_numpy(v) for k, v in random_features(_shapes(ort.manifest), 9, seed=5).items()}
    (p_pt2, score_pt2), (p_ort, score_ort) = pt2(features), ort(features)
    torch.testing.assert_close(p_ort, p_pt2, rtol=0, atol=1e-5)
    tolerance = score_tolerance(ort.manifest["engagement_weights"])
    torch.testing.assert_close(score_ort, score_pt2, rtol=0, atol=tolerance)


def test_the_rank_endpoint_gives_the_same_scores_with_either_program(exported: Exported, exported_onnx: Path):
    features = random_features(_shapes(_manifest(exported_onnx)), 20, seed=6)
    candidates = [{"id": i, "features": {k: v[i].tolist() for k, v in features.items()}} for i in range(20)]
    body = json.dumps({"candidates": candidates})  # NaN and Infinity among the continuous values
    ranked = {}
    for folder in (exported.folder, exported_onnx):
        # A real server: the app's lifespan starts the batcher thread that owns the model.
        with serving(create_app(folder)) as url:
            response = httpx.post(
                f"{url}/v1/rank", content=body, headers={"content-type": "application/json"}, timeout=60
            )
        assert response.status_code == 200, response.text
        ranked[folder] = {c["id"]: c for c in response.json()["candidates"]}
    pt2, ort = ranked[exported.folder], ranked[exported_onnx]
    assert sorted(ort) == sorted(pt2) == list(range(20))
    tolerance = score_tolerance(exported.config.engagement_weights)
    for i, candidate in ort.items():
        assert candidate["score"] == pytest.approx(pt2[i]["score"], rel=0, abs=tolerance)
        assert list(candidate["probabilities"]) == list(pt2[i]["probabilities"])
        probabilities = list(candidate["probabilities"].values())
        np.testing.assert_allclose(probabilities, list(pt2[i]["probabilities"].values()), rtol=0, atol=1e-5)


def test_by_default_onnxruntime_takes_torchs_thread_count(exported_onnx: Path):
    scorer = Scorer(exported_onnx)
    assert scorer.program.session.get_session_options().intra_op_num_threads == torch.get_num_threads()


def test_the_export_command_writes_either_format_and_onnx_by_default(
    exported: Exported, exported_onnx: Path, tmp_path
):
    """Through the CLI, into one folder in turn: the same files as the fixtures' exports, and none of the
    other format left."""
    folder = tmp_path / "model"
    args = ["export", "--config", str(CONFIGS / "local_small.yaml"), "--checkpoint", str(exported.checkpoint)]
    for override in OVERRIDES:
        args += ["--set", override]
    args += ["--out", str(folder)]
    assert main([*args, "--format", "pt2"]) == 0
    assert (folder / "model.pt2").read_bytes() == (exported.folder / "model.pt2").read_bytes()
    assert main(args) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in exported_onnx.iterdir())
    assert (folder / "model.onnx").read_bytes() == (exported_onnx / "model.onnx").read_bytes()
    assert main([*args, "--format", "pt2"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.pt2", "schema.json"]


def test_an_unknown_format_is_refused(exported: Exported, tmp_path):
    with pytest.raises(UserError, match="^format tf: not one of onnx, pt2"):
        export_model(exported.config, checkpoint=str(exported.checkpoint), out=str(tmp_path), format="tf")


def test_a_bfloat16_input_is_refused(exported: Exported, tmp_path):
    downcast = "train_data.preprocess={downcast: {features: {user_embedding: bfloat16}}}"
    config = load_config(CONFIGS / "local_small.yaml", [*OVERRIDES, downcast])
    with pytest.raises(UserError, match="^format onnx: input user_embedding is bfloat16 .* format pt2"):
        export_model(config, checkpoint=str(exported.checkpoint), out=str(tmp_path), format="onnx")


def test_onnxruntime_threads_do_not_spin_between_calls(exported_onnx: Path):
    """Spinning idle threads took the cores that torch, the server's own threads and other processes need
    (serve/scorer.py)."""
    options = Scorer(exported_onnx).program.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
