"""What `heavyranker serve --repository` holds over many swaps and requests: a server runs for days while a
training loop publishes a version every few minutes (100-300 a day).

    .venv/bin/python bench/serve_soak.py [--config configs/local_prod.yaml] [--swaps 40]
        [--variants local-onnx,local-pt2,s3-onnx,s3-pt2] [--threads 1]

Each variant is a repository (`local`: a folder; `s3`: moto's S3 server on loopback, started here) and an
export format, or precision (`int8`: ONNX, `bf16`: pt2). The config's model is exported twice (initial
weights of two seeds) and published alternately, keeping 3, each once the server (a subprocess, polling
every POLL_S, its TMPDIR a folder of the bench's) reports the previous one on /v1/model. After each swap
the server gets a round of requests (ROUND): valid ones of several sizes on /v1 as JSON and binary and on
/v2, malformed ones, one whose client closes the connection half way through its body and one whose
client gives up before the answer; then the bench reads the server's resident memory (VmRSS), open file
descriptors, threads, the files under its TMPDIR (downloads of an object-store repository, temporaries)
and the number of series on /metrics. The figures, a table each with a row per variant: the value after
the first swap and after the last, and the growth per swap: the slope of a least-squares line over the
last half of the swaps (the first ones include allocators' and caches' growth to their working size). A
bounded server's slopes are near 0. Its RSS, read right after a swap and a round, used to move by up to a
model's size from one swap to the next (the version swapped out freed at Python's next full collection,
then kept by glibc's heap); the server now frees it at the swap and hands its memory back (versions.py).
Results go to bench/results/serve_soak.json (--results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import torch
from results import add_results_option, cpu_line, write_results
from serve_latency import binary_body, json_body, launch_server
from serve_swap import MODEL_NAME, export, memory_mib, publish

from heavyranker.serve.repository import ModelRepository, open_repository
from heavyranker.serve.request import parse_candidates
from heavyranker.serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.2
SWAP_TIMEOUT_S = 300
ROUND = (1, 7, 64)  # candidates of the valid requests of a round, each as JSON, binary and /v2
BUCKET = "soak"
# variant's export -> (format, precision)
EXPORTS = {
    "onnx": ("onnx", "fp32"),
    "pt2": ("pt2", "fp32"),
    "int8": ("onnx", "int8"),
    "bf16": ("pt2", "bf16"),
}


def resources(pid: int, tmp: Path) -> dict[str, float]:
    files = [p for p in tmp.rglob("*") if p.is_file()]
    return {
        "rss_mib": memory_mib(pid, "VmRSS"),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "tmp_files": len(files),
        "tmp_mib": sum(p.stat().st_size for p in files) / 2**20,
    }


def slope(values: list[float]) -> float:
    """Growth per swap: the least-squares slope over the last half of the swaps."""
    half = values[len(values) // 2 :]
    # Rounded: a flat series' fit leaves float noise (1e-16), not a growth.
    return round(float(np.polyfit(np.arange(len(half)), half, 1)[0]), 3) if len(half) > 1 else 0.0


def wait_for_version(client: httpx.Client, version: int) -> None:
    deadline = time.monotonic() + SWAP_TIMEOUT_S
    while client.get("/v1/model").json().get("model_version") != str(version):
        if time.monotonic() > deadline:
            raise SystemExit(f"version {version} was not served within {SWAP_TIMEOUT_S} s")
        time.sleep(POLL_S / 2)


def send_round(client: httpx.Client, url: str, bodies: list[tuple[bytes, dict, bytes]]) -> int:
    """One round of requests (the module's docstring); the number of unexpected answers."""
    unexpected = 0
    for body, (binary, headers), v2 in bodies:
        answers = [
            client.post("/v1/rank", content=body, headers={"content-type": "application/json"}),
            client.post("/v1/rank", content=binary, headers=headers),
            client.post(
                f"/v2/models/{MODEL_NAME}/infer", content=v2, headers={"content-type": "application/json"}
            ),
        ]
        unexpected += sum(a.status_code != 200 for a in answers)
    malformed = [
        client.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"}),
        client.post(
            "/v1/rank", content=b'{"candidates": [{"id": 1}]}', headers={"content-type": "application/json"}
        ),
        client.post("/v1/rank", content=b"\x00" * 40, headers={"content-type": "application/octet-stream"}),
        client.post("/v1/rank", content=b"x", headers={"content-type": "text/plain"}),
        client.get("/no/such/route"),
    ]
    unexpected += sum(not 400 <= a.status_code < 500 for a in malformed)
    closed_half_way(url, bodies[-1][0])
    with contextlib.suppress(httpx.TimeoutException):  # a client that gives up before the answer
        httpx.post(
            f"{url}/v1/rank",
            content=bodies[-1][0],
            headers={"content-type": "application/json"},
            timeout=1e-4,
        )
    return unexpected


def closed_half_way(url: str, body: bytes) -> None:
    """A request whose client closes the connection after half its body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        head = f"POST /v1/rank HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        connection.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])


def v2_body(body: bytes, scorer: Scorer) -> bytes:
    ids, arrays = parse_candidates(body, scorer.inputs, 10**6)
    inputs = [
        {"name": name, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        for name, a in arrays.items()
    ]
    return json.dumps({"inputs": inputs}).encode()


@contextlib.contextmanager
def object_store() -> Iterator[str]:
    """moto's S3 server on loopback, with the environment that points s3fs at it (here and in the server)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request to the store
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="soak",
        AWS_SECRET_ACCESS_KEY="soak",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    try:
        import fsspec

        fsspec.filesystem("s3").mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        moto.stop()


def soak(variant: str, args: argparse.Namespace, tmp: Path, store: str | None) -> dict:
    where, kind = variant.split("-")
    fmt, precision = EXPORTS[kind]
    folders = [export(args.config, seed, tmp, format=fmt, precision=precision) for seed in (0, 1)]
    scorer = Scorer(folders[0])
    bodies = []
    for i, candidates in enumerate(ROUND):
        body = json_body(scorer.inputs, candidates, seed=i)
        bodies.append(
            (body, binary_body(*parse_candidates(body, scorer.inputs, candidates)), v2_body(body, scorer))
        )
    root = f"{store}/{variant}" if where == "s3" else str(tmp / "repo")
    repository: ModelRepository = open_repository(root, MODEL_NAME)
    publish(repository, folders[0])
    server_tmp = tmp / "server-tmp"
    server_tmp.mkdir()
    os.environ["TMPDIR"] = str(
        server_tmp
    )  # the server's downloads and temporaries, where they can be counted
    try:
        server, url = launch_server(
            ["--repository", root, "--model-name", MODEL_NAME, "--poll-seconds", str(POLL_S)], args.threads
        )
    finally:
        os.environ.pop("TMPDIR")
    samples, unexpected = [], 0
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            for swap in range(args.swaps):
                version = publish(repository, folders[(swap + 1) % 2])
                wait_for_version(client, version)
                unexpected += send_round(client, url, bodies)
                series = sum(not line.startswith("#") for line in client.get("/metrics").text.splitlines())
                samples.append({**resources(server.pid, server_tmp), "metrics_series": series})
                print(variant, swap + 1, samples[-1], flush=True)
    finally:
        server.terminate()
        server.wait()
    figures: dict[str, object] = {"unexpected_answers": unexpected}
    for key in samples[0]:
        values = [s[key] for s in samples]
        figures[key] = {"first_swap": values[0], "last_swap": values[-1], "per_swap": slope(values)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_prod.yaml"))
    parser.add_argument("--swaps", type=int, default=40, help="versions published, one after another")
    parser.add_argument(
        "--variants", default="local-onnx,local-pt2,s3-onnx,s3-pt2", help="repository-export, ..."
    )
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    add_results_option(parser, "serve_soak")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_line())
    variants = args.variants.split(",")
    soaked = {}
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(object_store()) if any(v.startswith("s3-") for v in variants) else None
        for variant in variants:
            with tempfile.TemporaryDirectory() as tmp:
                soaked[variant] = soak(variant, args, Path(tmp), store)
            print(variant, soaked[variant], flush=True)
    # One table per figure: a row per variant.
    figures = {"swaps": args.swaps}
    for key in soaked[variants[0]]:
        figures[key] = {variant: soaked[variant][key] for variant in variants}
    write_results("serve_soak", figures, args)


if __name__ == "__main__":
    main()
