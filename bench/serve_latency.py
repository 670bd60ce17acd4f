"""Latency of `heavyranker serve` against the bare exported model, on the same candidates in the same run.

    .venv/bin/python bench/serve_latency.py [--config configs/local_prod.yaml] [--checkpoint CKPT]
                                            [--model DIR] [--candidates 1000] [--requests 12] [--threads N]

Exports the config's model (initial weights unless --checkpoint; --model uses an exported folder as is),
starts `heavyranker serve` in a subprocess on a free loopback port, and builds one request of `candidates`
candidates (values rounded to 4 decimals, as a feature pipeline would print them). Then:
  - concurrency 1: requests alternate with bare forwards of the loaded program on the same candidates (in
    this process, while the server is idle), so both see the same machine load;
  - concurrency 4: four clients send `requests` requests in all.
Prints p50/p99 latency and candidates/s per level, and p50 at concurrency 1 / p50 of the bare forward: the
serving overhead (HTTP, JSON parsing and validation, response), aimed at <= 1.3. The summary goes to
bench/results/serve_latency.json (--results).
--threads sets torch's intra-op threads of both the server and the bare forward (default: torch's, one per
core). On a machine shared with other jobs, 1 gives steadier numbers: a parallel op waits for its slowest
thread, and a thread that lost its core to a neighbour stalls every op.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from results import add_results_option, write_results

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.shapes import feature_shapes
from heavyranker.model import build_model
from heavyranker.serve.export import export_model
from heavyranker.serve.request import parse_candidates
from heavyranker.serve.scorer import InputSpec, Scorer

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def export(config_path: str, checkpoint: str | None, folder: Path) -> Path:
    config = load_config(config_path)
    if checkpoint is None:
        torch.manual_seed(0)
        model = build_model(config, feature_shapes(config.train_data))
        checkpoint = str(save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0}))
    return export_model(config, checkpoint=checkpoint, out=str(folder / "model"))


def request_body(inputs: list[InputSpec], candidates: int) -> bytes:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(candidates):
        features = {}
        for spec in inputs:
            if spec.name == "binary":
                features[spec.name] = rng.integers(0, 2, spec.width).tolist()
            elif spec.name == "continuous":  # heavy-tailed counts and rates, some missing
                values = np.round(rng.standard_t(3, spec.width) * 5, 4)
                values[rng.random(spec.width) < 0.05] = np.nan
                features[spec.name] = values.tolist()
            else:
                features[spec.name] = np.round(rng.standard_normal(spec.width), 4).tolist()
        rows.append({"id": f"tweet-{i}", "features": features})
    return json.dumps({"candidates": rows}).encode()


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "heavyranker", "serve", "--model", str(model), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start (exit code {server.poll()})")
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)


def post(client: httpx.Client, body: bytes) -> float:
    start = time.perf_counter()
    response = client.post("/v1/rank", content=body, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"the server answered {response.status_code}: {response.text[:500]}")
    return elapsed


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_prod.yaml"))
    parser.add_argument("--checkpoint", help="default: the model's initial weights")
    parser.add_argument("--model", help="an exported model folder (skips the export)")
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=12, help="per concurrency level")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    add_results_option(parser, "serve_latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="serve_latency_") as tmp:
        model = Path(args.model) if args.model else export(args.config, args.checkpoint, Path(tmp))
        scorer = Scorer(model)
        scorer.warm_up()
        body = request_body(scorer.inputs, args.candidates)
        _, arrays = parse_candidates(body, scorer.inputs, args.candidates)
        features = {name: torch.from_numpy(array) for name, array in arrays.items()}
        server, url = start_server(model, args.threads)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                post(client, body)  # first request: connection, allocations
                bare, serial = [], []
                for _ in range(args.requests):
                    start = time.perf_counter()
                    scorer(features)
                    bare.append(time.perf_counter() - start)
                    serial.append(post(client, body))
            clients = [httpx.Client(base_url=url, timeout=600) for _ in range(4)]
            start = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                parallel = list(pool.map(lambda i: post(clients[i % 4], body), range(args.requests)))
            parallel_wall = time.perf_counter() - start
            for c in clients:
                c.close()
        finally:
            server.terminate()
            server.wait(timeout=60)

    levels = {  # candidates/s: at the median latency one request at a time; over the wall time with four
        "bare forward": latency(bare, args.candidates / statistics.median(bare)),
        "concurrency 1": latency(serial, args.candidates / statistics.median(serial)),
        "concurrency 4": latency(parallel, args.candidates * args.requests / parallel_wall),
    }
    overhead = levels["concurrency 1"]["p50_ms"] / levels["bare forward"]["p50_ms"]
    mb = len(body) / 1e6
    print(f"{args.candidates} candidates, {mb:.1f} MB of JSON per request, {args.threads} intra-op threads")
    for name, level in levels.items():
        print(
            f"{name + ':':15s} p50 {level['p50_ms']:7.0f} ms  p99 {level['p99_ms']:7.0f} ms  "
            f"{level['candidates_per_s']:7.0f} candidates/s"
        )
    print(f"serve_latency: p50 / bare forward = {overhead:.2f} (aim <= 1.3)")
    figures = {"request_mb": mb, **levels, "p50_over_bare_forward": overhead}
    write_results("serve_latency", figures, args)


def latency(seconds: list[float], candidates_per_s: float) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(seconds) * 1e3,
        "p99_ms": percentile(seconds, 99) * 1e3,
        "candidates_per_s": candidates_per_s,
    }


if __name__ == "__main__":
    main()
