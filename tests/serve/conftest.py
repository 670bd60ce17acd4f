"""One exported local_small model for every serve test: initial weights with randomized batch-norm
statistics (so eval-mode normalisation is not the identity), saved as a checkpoint at step 7 and exported,
as torch.export program and as ONNX model; its config takes save_dir from the environment, as a
deployment's might. And a uvicorn server for an app."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
import yaml
from fastapi import FastAPI

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import Config, load_config
from heavyranker.data.columns import feature_specs
from heavyranker.data.shapes import feature_shapes
from heavyranker.data.sources.tfrecord import write_records
from heavyranker.data.tf_example import encode_example
from heavyranker.model import Ranker, build_model
from heavyranker.model.linear import HAS_ONEDNN
from heavyranker.serve.app import server_config
from heavyranker.serve.export import export_model
from tests.conftest import CONFIGS

# is_replied's negatives kept at 1%, its positives at 50%: the calibration is not the identity. The backbone's
# last layer (128 -> 1024) is large enough to run on oneDNN in the eager model (model/linear.py): the
# exported programs must hold plain linear products all the same.
OVERRIDES = [
    "train_data.tasks.recap.engagement.is_replied={pos_downsampling_rate: 0.5, neg_downsampling_rate: 0.01}",
    "model.backbone.mask_net_config.mlp.layer_sizes=[1024]",
]
STEP = 7
ENV_VAR, ENV_VALUE = "HEAVYRANKER_TEST_RUNS", "runs-named-by-the-environment"
SHAPES = {  # the inputs of local_small's exported model, in the manifest's order
    "continuous": (48,),
    "binary": (16,),
    "user_embedding": (16,),
    "user_eng_embedding": (16,),
    "author_embedding": (16,),
}


@dataclass
class Exported:
    config: Config
    model: Ranker  # the eager model, in eval mode, with the exported weights
    folder: Path
    checkpoint: Path


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    config = _load_with_env(root)
    torch.manual_seed(0)
    # On oneDNN whatever this CPU's default kernel (model/linear.py), as the comment on OVERRIDES says.
    matmul = "onednn" if HAS_ONEDNN else "aten"
    specs = feature_specs(config.train_data)
    model = build_model(config.model, specs, config.train_data.tasks, matmul=matmul)
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0.0, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 2.0, generator=gen)
    state = {"model": model.state_dict(), "step": STEP}
    checkpoint = save_checkpoint(root / "run" / "checkpoints", STEP, state)
    folder = export_model(config, checkpoint=str(checkpoint), out=str(root / "model"), format="pt2")
    return Exported(config, model.eval(), folder, checkpoint)


def _load_with_env(folder: Path) -> Config:
    """local_small.yaml, written to `folder` with save_dir `${ENV_VAR}/run` and its schema's absolute path,
    loaded with ENV_VAR set to ENV_VALUE."""
    data = yaml.safe_load((CONFIGS / "local_small.yaml").read_text())
    data["training"]["save_dir"] = "${" + ENV_VAR + "}/run"
    data["train_data"]["seg_dense_schema"]["schema_path"] = str(CONFIGS / "segdense_small.json")
    path = folder / "local_small.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(ENV_VAR, ENV_VALUE)
        return load_config(path, OVERRIDES)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` under a real uvicorn server on a free loopback port, in a thread: yields its base URL."""
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so, and without it every
    # response waits 40 ms for a delayed ACK. Port 0: a free port, held from here on.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def exported_onnx(exported: Exported) -> Path:
    """The same checkpoint exported as an ONNX model: the folder."""
    out = exported.folder.parent / "model_onnx"
    return export_model(exported.config, checkpoint=str(exported.checkpoint), out=str(out), format="onnx")


def random_features(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Features as the data has them: heavy-tailed continuous values (with some NaN and inf, which the
    featurization zeroes), 0/1 flags, small discrete ids, unit-scale embeddings, int64 meta ids."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        size = (n, *shape)
        if name == "continuous":
            values = (rng.standard_t(3, size) * 5).astype(np.float32)
            values[rng.random(size) < 0.02] = np.nan
            values[rng.random(size) < 0.01] = np.inf
            out[name] = values
        elif name == "binary":
            out[name] = rng.integers(0, 2, size).astype(np.float32)
        elif name == "discrete" or name.startswith("meta__"):
            out[name] = rng.integers(0, 1 << 40, size, dtype=np.int64)
        else:
            out[name] = rng.standard_normal(size).astype(np.float32)
    return out


def score_tolerance(weights: dict[str, float]) -> float:
    """How far the score may move when each probability is off by at most 1e-5: sum_i |w_i| * 1e-5."""
    return 1e-5 * sum(abs(w) for w in weights.values())


def json_request(ids: list, features: dict[str, np.ndarray]) -> bytes:
    """A JSON /v1/rank body."""
    candidates = [
        {"id": cid, "features": {name: values[i].tolist() for name, values in features.items()}}
        for i, cid in enumerate(ids)
    ]
    return json.dumps({"candidates": candidates}).encode()


def tensors(features: dict[str, np.ndarray], binary: bool) -> tuple[list[dict], bytes]:
    """float32 and int64 arrays as the Open Inference Protocol describes tensors in its JSON, and their
    binary data (little-endian, in order)."""
    described, data = [], b""
    for name, values in features.items():
        datatype = {np.float32: "FP32", np.int64: "INT64"}[values.dtype.type]
        tensor = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if binary:
            tensor["parameters"] = {"binary_data_size": values.nbytes}
            data += values.astype(values.dtype.newbyteorder("<")).tobytes()
        else:
            tensor["data"] = values.tolist()  # nested lists: the protocol takes them as well as flat ones
        described.append(tensor)
    return described, data


def binary_request(header: dict, data: bytes) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a request in the binary tensor layout: the JSON header, then the data."""
    text = json.dumps(header).encode()
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(text))}
    return text + data, headers


UNLABELLED_EXAMPLES = 50


@pytest.fixture(scope="session")
def records(exported: Exported, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """One gzipped file of UNLABELLED_EXAMPLES records holding every feature the config reads and no label."""
    data = exported.config.train_data
    features = random_features(feature_shapes(data), UNLABELLED_EXAMPLES, seed=11)
    sources = data.seg_dense_schema.renamed_features
    folder = tmp_path_factory.mktemp("records")
    rows = []
    for i in range(UNLABELLED_EXAMPLES):
        row = {}
        for name, values in features.items():
            value = values[i].reshape(-1)
            row[sources[name]] = value.astype(np.int64) if name == "binary" else value  # flags are int64_list
        rows.append(encode_example(row))
    write_records(str(folder / "part-0.gz"), rows)
    return folder, features
