"""The exported folder: same outputs as the eager model, a manifest that says what it holds, loadable with
torch and scorer.py alone, and refused when damaged."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from heavyranker.checkpoint import load_checkpoint, save_checkpoint
from heavyranker.cli import main
from heavyranker.config.training import KeepBestConfig
from heavyranker.errors import UserError
from heavyranker.run_folder import BestMarker, RunFolder
from heavyranker.serve import scorer as scorer_module
from heavyranker.serve.export import export_model
from heavyranker.serve.scorer import ArtifactError, Scorer
from tests.conftest import CONFIGS
from tests.serve.conftest import OVERRIDES, STEP, Exported, random_features

REPLIED = "recap.engagement.is_replied"
REPLIED_RATIO = 0.01 / 0.5  # neg / pos downsampling rate, see OVERRIDES


def _input_shapes(exported: Exported) -> dict[str, tuple[int, ...]]:
    manifest = json.loads((exported.folder / "manifest.json").read_text())
    return {i["name"]: tuple(i["shape"]) for i in manifest["inputs"]}


def _torch(features: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(values) for name, values in features.items()}


@pytest.mark.parametrize("n", [1, 7, 300])
def test_outputs_equal_the_eager_model(exported: Exported, n: int):
    features = _torch(random_features(_input_shapes(exported), n, seed=n))
    scorer = Scorer(exported.folder)
    probabilities, score = scorer(features)
    with torch.no_grad():
        eager = exported.model(features)
    torch.testing.assert_close(probabilities, eager["calibrated_probabilities"], rtol=1e-5, atol=1e-5)
    weights = torch.tensor(
        [exported.config.engagement_weights[t] for t in exported.config.task_names], dtype=torch.float64
    )
    torch.testing.assert_close(
        score.double(), eager["calibrated_probabilities"].double() @ weights, rtol=1e-5, atol=1e-4
    )
    assert torch.isfinite(probabilities).all()  # the NaN and inf among the continuous values are zeroed

    # Calibrated, not raw: q r / (1 - q + r q) of the model's own probability, for the downsampled task.
    q = eager["probabilities"][:, exported.config.task_names.index(REPLIED)].double()
    expected = q * REPLIED_RATIO / (1 - q + REPLIED_RATIO * q)
    torch.testing.assert_close(
        probabilities[:, scorer.tasks.index(REPLIED)].double(), expected, rtol=1e-5, atol=1e-6
    )


def test_manifest_says_what_the_folder_holds(exported: Exported):
    manifest = json.loads((exported.folder / "manifest.json").read_text())
    config = exported.config
    assert manifest["format"] == "heavyranker-scorer/2"
    assert (manifest["program_format"], manifest["program"]) == ("pt2", "model.pt2")
    assert manifest["tasks"] == config.task_names
    # local_small: 48 continuous, 16 binary, three 16-wide TwHIN embeddings; discrete and meta ids unused.
    assert manifest["inputs"] == [
        {"name": "continuous", "shape": [48], "dtype": "float32", "allow_non_finite": True},
        {"name": "binary", "shape": [16], "dtype": "float32", "allow_non_finite": False},
        {"name": "user_embedding", "shape": [16], "dtype": "float32", "allow_non_finite": False},
        {"name": "user_eng_embedding", "shape": [16], "dtype": "float32", "allow_non_finite": False},
        {"name": "author_embedding", "shape": [16], "dtype": "float32", "allow_non_finite": False},
    ]
    assert manifest["engagement_weights"] == config.engagement_weights
    assert manifest["engagement_weights"]["recap.engagement.is_report_tweet_clicked"] == -369.0
    assert manifest["config"] == config.model_dump(mode="json")
    assert manifest["checkpoint"] == {"path": str(exported.checkpoint.resolve()), "step": STEP}
    program = exported.folder / manifest["program"]
    assert manifest["program_sha256"] == hashlib.sha256(program.read_bytes()).hexdigest()
    assert (exported.folder / manifest["schema"]).read_text() == (CONFIGS / "segdense_small.json").read_text()


SCORE_WITHOUT_HEAVYRANKER = """
import importlib.abc, importlib.util, sys
import numpy as np, torch

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "heavyranker":
            raise ImportError("heavyranker is not available here")

sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("scorer", sys.argv[1])
scorer_module = importlib.util.module_from_spec(spec)
sys.modules["scorer"] = scorer_module  # dataclasses look their module up
spec.loader.exec_module(scorer_module)
scorer = scorer_module.Scorer(sys.argv[2])
features = {name: torch.from_numpy(values) for name, values in np.load(sys.argv[3]).items()}
probabilities, score = scorer(features)
assert not any(name.split(".")[0] == "heavyranker" for name in sys.modules)
assert ("onnxruntime" in sys.modules) == (scorer.manifest["program_format"] == "onnx")
np.savez(sys.argv[4], probabilities=probabilities.numpy(), score=score.numpy())
"""


@pytest.mark.parametrize("program", ["pt2", "onnx"])
def test_loads_and_scores_with_torch_and_scorer_py_alone(
    exported: Exported, exported_onnx: Path, program: str, tmp_path
):
    """And onnxruntime for an ONNX program, only then."""
    folder = exported.folder if program == "pt2" else exported_onnx
    features = random_features(_input_shapes(exported), 5, seed=3)
    np.savez(tmp_path / "in.npz", **features)
    args = [scorer_module.__file__, str(folder), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")]
    subprocess.run([sys.executable, "-c", SCORE_WITHOUT_HEAVYRANKER, *args], check=True, cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        eager = exported.model(_torch(features))["calibrated_probabilities"].numpy()
    np.testing.assert_allclose(out["probabilities"], eager, rtol=1e-5, atol=1e-5)


def test_a_damaged_program_is_refused(exported: Exported, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(exported.folder, folder)
    program = bytearray((folder / "model.pt2").read_bytes())
    program[len(program) // 2] ^= 0xFF
    (folder / "model.pt2").write_bytes(bytes(program))
    with pytest.raises(ArtifactError, match=r"model\.pt2: content hash .* differs from the manifest") as e:
        Scorer(folder)
    assert isinstance(e.value, UserError)  # the CLI prints it without a traceback


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("format", "heavyranker-scorer/1", "format 'heavyranker-scorer/1', .* export the model again"),
        ("program_format", "tflite", r"program_format 'tflite', not one of \['onnx', 'pt2'\]"),
    ],
)
def test_a_manifest_of_another_format_is_refused(exported: Exported, tmp_path, key, value, message):
    folder = shutil.copytree(exported.folder, tmp_path / "model")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: {message}"):
        Scorer(folder)


def without_inputs(manifest: dict) -> None:
    del manifest["inputs"]


def unknown_dtype(manifest: dict) -> None:
    manifest["inputs"][1]["dtype"] = "float99"


def inputs_not_a_list(manifest: dict) -> None:
    manifest["inputs"] = {"continuous": 48}


@pytest.mark.parametrize(
    "damage, message",
    [
        (without_inputs, r"no 'inputs': damaged, or not written by `heavyranker export`"),
        (unknown_dtype, r"inputs\[1\]: \{'name': 'binary'.* is not an input as .* writes one"),
        (inputs_not_a_list, r"inputs\[0\]: \{'continuous': 48\} is not an input as .* writes one"),
    ],
)
def test_a_manifest_without_what_serving_reads_is_refused_in_one_line(
    exported: Exported, tmp_path, capsys, damage, message
):
    # Was a KeyError, TypeError or AttributeError with a traceback, at the start or at a request.
    folder = shutil.copytree(exported.folder, tmp_path / "model")
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: {message}") as e:
        Scorer(folder)
    assert isinstance(e.value, UserError)
    assert main(["serve", "--model", str(folder)]) == 2
    assert re.fullmatch(rf"error: .*manifest\.json: {message}\n", capsys.readouterr().err)


def test_a_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"manifest\.json: cannot read the .* `heavyranker export`"):
        Scorer(tmp_path)


def test_export_command_gives_the_same_program(exported: Exported, tmp_path):
    """From the run folder (newest checkpoint) through the CLI: the same weights give the same file."""
    args = [
        "export",
        "--config",
        str(CONFIGS / "local_small.yaml"),
        "--checkpoint",
        str(exported.checkpoint.parent.parent),
        "--out",
        str(tmp_path / "again"),
        "--format",
        "pt2",
    ]
    for override in OVERRIDES:
        args += ["--set", override]
    assert main(args) == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    first = json.loads((exported.folder / "manifest.json").read_text())
    assert again["program_sha256"] == first["program_sha256"]


@pytest.mark.parametrize(
    "under, message", [("", "taken: not a folder"), ("model", "taken/model: cannot make the model folder")]
)
def test_an_out_that_cannot_be_a_folder_is_one_line(exported: Exported, tmp_path, under, message):
    # It was a FileExistsError (NotADirectoryError) traceback, after the whole export.
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" / under if under else tmp_path / "taken"
    with pytest.raises(UserError) as e:
        export_model(exported.config, checkpoint=str(exported.checkpoint), out=str(out), format="pt2")
    assert str(e.value).startswith(f"{tmp_path}/{message}")


def test_export_without_a_checkpoint_says_where_it_looked(exported: Exported, tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint at {tmp_path}"):
        export_model(exported.config, checkpoint=str(tmp_path), out=str(tmp_path / "out"), format="pt2")


def test_export_without_a_checkpoint_takes_the_marked_best_with_keep_best(exported: Exported, tmp_path):
    state = load_checkpoint(exported.checkpoint)
    for step in (3, 5):
        save_checkpoint(tmp_path / "run" / "checkpoints", step, {**state, "step": step})
    RunFolder(tmp_path / "run").write_best(BestMarker(3, "validation", "mean", "rce", 1.0, 0, 3))
    config = exported.config.model_copy(deep=True)
    config.training.save_dir = str(tmp_path / "run")
    config.training.keep_best = KeepBestConfig(split="validation")
    export_model(config, out=str(tmp_path / "out"), format="pt2")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["checkpoint"]["step"] == 3
