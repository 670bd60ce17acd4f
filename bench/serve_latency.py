"""Latency and throughput of `heavyranker serve` against the bare exported model, on the same candidates in
the same run.

    .venv/bin/python bench/serve_latency.py [--config configs/local_prod.yaml] [--checkpoint CKPT]
        [--model DIR] [--candidates 100,1000] [--concurrency 1,4,16] [--requests 16] [--threads N]
        [--precisions fp32,bf16,int8]

Exports the config's model (initial weights unless --checkpoint; --model uses an exported folder as is),
starts `heavyranker serve` in a subprocess on a free loopback port (its queue as deep as the highest
concurrency, so that no request is refused, and a long read timeout: READ_TIMEOUT_S), and builds for each
request size one request of random candidates twice: as JSON (values rounded to 4 decimals, as a feature
pipeline would print them) and as binary tensors (/v1/rank's application/octet-stream layout). Then, for
each size:
  - concurrency 1: requests of each format alternate with bare forwards of the loaded program on the same
    candidates (in this process, while the server is idle), so that all see the same machine load;
  - concurrency 4, 16, ...: as many clients send `requests` requests in all (at least one each), and the
    bare forward scores as many candidates at once as the server's batcher can merge (--max-batch).
Latency is p50 and p99 per request; candidates/s is over the median latency at concurrency 1, over the
wall time otherwise. Two ratios, binary format:
  - p50 at concurrency 1 of the largest requests / the bare forward's: the serving overhead (HTTP, parsing,
    the batcher, the response), aimed at <= 1.15;
  - candidates/s at the highest concurrency of the smallest requests / the bare batched forward's: what
    dynamic batching recovers of one large forward, aimed at >= 0.9.
Every precision of --precisions is exported (fp32 and int8 as ONNX, bf16 as pt2: serve/precision.py) and
served by a server of its own, all started at once, and measured the same way: at concurrency 1 each round
goes through every precision in turn (which goes first rotates), so that all see the same machine load;
the higher concurrencies take one precision after the other. The figures above are the first
precision's, and `precision` lists, for each, the binary requests' p50, p99 and candidates/s at concurrency
1 and its candidates/s over fp32's. With --model, only that folder. The summary goes to
bench/results/serve_latency.json (--results). --threads sets torch's intra-op threads of
both the server and the bare forward (default: torch's, one per core). On a machine shared with other jobs, 1
gives steadier numbers: a parallel op waits for its slowest thread, and a thread that lost its core to a
neighbour stalls every op.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import torch
from results import add_results_option, cpu_line, write_results

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.config.serving import ServeOptions
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.export import export_model
from heavyranker.serve.request import parse_candidates
from heavyranker.serve.scorer import InputSpec, Scorer

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300
# The server's read timeout (default 10 s) raised: parsing a JSON body holds the GIL throughout (jiter, then
# numpy), so while 16 bodies of 55 MB are parsed the event loop reads the next ones slower than 10 s allows
# and the defaults answer 408. The binary format has no such parse.
READ_TIMEOUT_S = 300
MAX_BATCH = ServeOptions().max_batch  # the server's, which the bench leaves at its default
Request = tuple[bytes, dict[str, str]]  # body, headers


FORMATS = {"fp32": "onnx", "bf16": "pt2", "int8": "onnx"}  # each precision's format (serve/precision.py)


def export(config_path: str, checkpoint: str | None, folder: Path, precisions: list[str]) -> dict[str, Path]:
    """The model folder of each precision, all of one checkpoint."""
    config = load_config(config_path)
    if checkpoint is None:
        torch.manual_seed(0)
        model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
        checkpoint = str(save_checkpoint(folder / "checkpoints", 0, {"model": model.state_dict(), "step": 0}))
    return {
        p: export_model(config, checkpoint=checkpoint, out=str(folder / p), format=FORMATS[p], precision=p)
        for p in precisions
    }


def json_body(inputs: list[InputSpec], candidates: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
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


def binary_body(ids: list, arrays: dict[str, np.ndarray]) -> Request:
    """The same candidates in /v1/rank's binary layout: a JSON header, then each tensor's bytes."""
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    tensors = [
        {
            "name": name,
            "datatype": datatypes[array.dtype],
            "shape": list(array.shape),
            "parameters": {"binary_data_size": array.nbytes},
        }
        for name, array in arrays.items()
    ]
    header = json.dumps({"ids": ids, "inputs": tensors}).encode()
    data = b"".join(array.astype(array.dtype.newbyteorder("<")).tobytes() for array in arrays.values())
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return header + data, headers


def start_server(
    model: Path, threads: int, max_queue: int, max_candidates: int
) -> tuple[subprocess.Popen, str]:
    options = ["--model", str(model), "--max-queue", str(max_queue), "--max-candidates", str(max_candidates)]
    return launch_server([*options, "--read-timeout", str(READ_TIMEOUT_S)], threads)


def launch_server(options: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    """`heavyranker serve OPTIONS` on a free loopback port with torch on `threads` threads, once it answers
    /healthz: the process and its URL. Port 0: the server binds the system's free port and its start line
    names it (a port found free here first could be taken by another process before the server binds it)."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe that nobody drains; the server holds it open
    server = subprocess.Popen(
        [sys.executable, "-m", "heavyranker", "serve", *options, "--port", "0"],
        stdout=log,
        stderr=log,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    url = None
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start (exit code {server.poll()})")
        if url is None:
            log.seek(0)
            if started := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read()):
                url = started.group(1)
            time.sleep(0.2)
            continue
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.5)


def post(client: httpx.Client, request: Request) -> float:
    start = time.perf_counter()
    response = client.post("/v1/rank", content=request[0], headers=request[1])
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"the server answered {response.status_code}: {response.text[:500]}")
    return elapsed


def repeated(arrays: dict[str, np.ndarray], rows: int) -> dict[str, torch.Tensor]:
    """`rows` candidates for the bare forward: the request's, repeated."""
    copies = -(-rows // len(next(iter(arrays.values()))))
    return {name: torch.from_numpy(np.concatenate([array] * copies)[:rows]) for name, array in arrays.items()}


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def concurrent(url: str, request: Request, clients: int, requests: int) -> tuple[list[float], float]:
    """`clients` threads, each with its connection, send max(requests, clients) requests in all:
    (latencies, wall time)."""
    per_client = -(-max(requests, clients) // clients)
    connections = [httpx.Client(base_url=url, timeout=600) for _ in range(clients)]
    try:
        for connection in connections:
            connection.get("/healthz")  # connect outside the timing
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            runs = pool.map(lambda c: [post(c, request) for _ in range(per_client)], connections)
            latencies = [t for run in runs for t in run]
        return latencies, time.perf_counter() - start
    finally:
        for connection in connections:
            connection.close()


def level(latencies: list[float], candidates_per_s: float) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
        "candidates_per_s": candidates_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_prod.yaml"))
    parser.add_argument("--checkpoint", help="default: the model's initial weights")
    parser.add_argument("--model", help="an exported model folder (skips the export)")
    parser.add_argument("--candidates", default="100,1000", help="request sizes, comma-separated")
    parser.add_argument("--concurrency", default="1,4,16", help="clients at once, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="per size, format and concurrency")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="exported and served in turn")
    add_results_option(parser, "serve_latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.candidates.split(",")]
    levels = sorted({1, *(int(c) for c in args.concurrency.split(","))})  # 1: the latency reference

    print(cpu_line())
    with tempfile.TemporaryDirectory(prefix="serve_latency_") as tmp:
        if args.model:
            models = {Scorer(args.model).precision: Path(args.model)}
        else:
            models = export(args.config, args.checkpoint, Path(tmp), args.precisions.split(","))
        scorers = {precision: Scorer(model) for precision, model in models.items()}
        servers = {}
        try:
            for precision, model in models.items():
                scorers[precision].warm_up()
                servers[precision] = start_server(model, args.threads, max(levels) - 1, max(sizes))
            urls = {precision: url for precision, (_, url) in servers.items()}
            by_precision = measure(scorers, urls, sizes, levels, args.requests)
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait(timeout=60)
        for precision, model in models.items():
            by_precision[precision]["threads"] = args.threads
            print(f"== {precision} ({model.name})")
            report(by_precision[precision], sizes, levels)
    figures = next(iter(by_precision.values()))
    figures["precision"] = precision_figures(by_precision, sizes)
    write_results("serve_latency", figures, args)


def precision_figures(by_precision: dict[str, dict], sizes: list[int]) -> dict[str, dict[str, float]]:
    """Per size and precision: the binary requests at concurrency 1, and candidates/s over fp32's."""
    figures = {}
    for n in sizes:
        fp32 = by_precision.get("fp32", {}).get("served", {}).get("binary", {}).get(n, {}).get(1)
        for precision, measured in by_precision.items():
            served = measured["served"]["binary"][n][1]
            speedup = served["candidates_per_s"] / fp32["candidates_per_s"] if fp32 else float("nan")
            figures[f"{n} candidates, {precision}"] = {**served, "candidates_per_s_over_fp32": speedup}
            print(
                f"{n} candidates, {precision}: p50 {served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms, "
                f"{served['candidates_per_s']:.0f} candidates/s, {speedup:.2f}x fp32's"
            )
    return figures


def measure(
    scorers: dict[str, Scorer], urls: dict[str, str], sizes: list[int], levels: list[int], requests: int
) -> dict[str, dict]:
    """Each precision's figures (its scorer here, its server at its url), on the same candidates."""
    by_precision: dict[str, dict] = {
        precision: {"request_mb": {}, "bare forward": {}, "served": {"json": {}, "binary": {}}}
        for precision in scorers
    }
    inputs = next(iter(scorers.values())).inputs  # every precision's program takes the same inputs
    for n in sizes:
        text = json_body(inputs, n)
        ids, arrays = parse_candidates(text, inputs, n)
        formats = {"json": (text, {"content-type": "application/json"}), "binary": binary_body(ids, arrays)}
        serial = alone(scorers, urls, repeated(arrays, n), formats, requests)
        for precision, figures in by_precision.items():
            times = serial[precision]
            figures["request_mb"][n] = {name: len(body) / 1e6 for name, (body, _) in formats.items()}
            figures["bare forward"][n] = {1: level(times["bare"], n / statistics.median(times["bare"]))}
            for name in formats:
                figures["served"][name][n] = {1: level(times[name], n / statistics.median(times[name]))}
            for clients in levels[1:]:
                loaded(figures, scorers[precision], urls[precision], arrays, formats, clients, requests)
    for figures in by_precision.values():
        finish(figures, sizes, levels)
    return by_precision


def alone(
    scorers: dict[str, Scorer],
    urls: dict[str, str],
    features: dict[str, torch.Tensor],
    formats: dict[str, Request],
    requests: int,
) -> dict[str, dict[str, list[float]]]:
    """Concurrency 1, precision by precision within each round (which goes first rotates), so that every
    precision sees the same machine load: a bare forward of the candidates, then each format's request while
    the server idles. Latencies in seconds, by precision and "bare" or format."""
    times = {precision: {"bare": [], **{name: [] for name in formats}} for precision in scorers}
    clients = {precision: httpx.Client(base_url=url, timeout=600) for precision, url in urls.items()}
    try:
        for client in clients.values():
            for request in formats.values():
                post(client, request)  # the connection, the server's first allocations
        order = list(scorers)
        for round_ in range(requests):
            for precision in order[round_ % len(order) :] + order[: round_ % len(order)]:
                times[precision]["bare"].append(timed(partial(scorers[precision], features)))
                for name, request in formats.items():
                    times[precision][name].append(post(clients[precision], request))
    finally:
        for client in clients.values():
            client.close()
    return times


def loaded(
    figures: dict,
    scorer: Scorer,
    url: str,
    arrays: dict[str, np.ndarray],
    formats: dict[str, Request],
    clients: int,
    requests: int,
) -> None:
    """`clients` at once: the served figures, and the bare forward of as many candidates at once as the
    batcher merges (whole requests, up to --max-batch)."""
    n = len(next(iter(arrays.values())))
    rows = n * min(clients, max(1, MAX_BATCH // n))
    batch = partial(scorer, repeated(arrays, rows))
    batched = [timed(batch) for _ in range(max(2, requests // clients))]
    figures["bare forward"][n][clients] = level(batched, rows / statistics.median(batched))
    for name, request in formats.items():
        latencies, wall = concurrent(url, request, clients, requests)
        figures["served"][name][n][clients] = level(latencies, n * len(latencies) / wall)


def finish(figures: dict, sizes: list[int], levels: list[int]) -> None:
    """The two ratios of the module's docstring."""
    largest, smallest, most = max(sizes), min(sizes), max(levels)
    served, bare = figures["served"]["binary"], figures["bare forward"]
    figures["p50_over_bare_forward"] = served[largest][1]["p50_ms"] / bare[largest][1]["p50_ms"]
    figures["candidates_per_s_over_bare_batched"] = (
        served[smallest][most]["candidates_per_s"] / bare[smallest][most]["candidates_per_s"]
    )


def report(figures: dict, sizes: list[int], levels: list[int]) -> None:
    print(f"{figures['threads']} intra-op threads; p50 / p99 ms, candidates/s")
    print(f"{'':10s} {'':8s}" + "".join(f"{f'concurrency {c}':>30s}" for c in levels))
    for n in sizes:
        mb = figures["request_mb"][n]
        print(f"{n} candidates: {mb['json']:.1f} MB as JSON, {mb['binary']:.1f} MB binary")
        rows = {
            "bare": figures["bare forward"][n],
            **{name: figures["served"][name][n] for name in ("json", "binary")},
        }
        for name, by_level in rows.items():
            cells = (by_level[c] for c in levels)
            print(
                f"{'':10s} {name:8s}"
                + "".join(
                    f"{c['p50_ms']:9.0f} {c['p99_ms']:7.0f} {c['candidates_per_s']:12.0f}" for c in cells
                )
            )
    largest, smallest, most = max(sizes), min(sizes), max(levels)
    print(
        f"serve_latency: p50 at concurrency 1, {largest} candidates, binary / bare forward = "
        f"{figures['p50_over_bare_forward']:.2f} (aim <= 1.15); candidates/s at concurrency {most}, "
        f"{smallest} candidates each, binary / bare batched forward = "
        f"{figures['candidates_per_s_over_bare_batched']:.2f} (aim >= 0.9)"
    )


if __name__ == "__main__":
    main()
