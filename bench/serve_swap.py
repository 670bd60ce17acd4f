"""Latency and throughput of `heavyranker serve --repository` while new versions swap in, against steady
state, in one run.

    .venv/bin/python bench/serve_swap.py [--config configs/local_prod.yaml] [--candidates 100]
        [--clients 4] [--steady-s 20] [--swaps 5] [--threads N]

Exports the config's model twice (initial weights of two seeds), publishes the first as version 1 of a
model repository in a temporary folder and starts `heavyranker serve --repository` on it in a subprocess
(polling every POLL_S). `clients` threads then send the same /v1/rank request of `candidates` candidates
in a closed loop, each request's start, end and the version that scored it recorded. First `steady-s`
seconds of steady state; then `swaps` new versions, the two exports in turn, each published once the
previous one answers: a swap's window runs from its publication to the first response of the new version,
so it holds the load and warm-up (one forward at max_batch) beside the serving. Figures: p50 and p99
latency and requests/s of the steady phase and of the requests that overlap a swap window, their ratio
(aimed at p99 during a swap <= 1.5x steady), failed requests (aimed at 0), the windows' median length,
and the server's peak resident memory (VmHWM: two versions in memory during a swap) against its resident
memory after the first version loaded. Results go to bench/results/serve_swap.json (--results).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from results import add_results_option, write_results
from serve_latency import json_body, launch_server

from heavyranker.checkpoint import save_checkpoint
from heavyranker.config import load_config
from heavyranker.data.columns import feature_specs
from heavyranker.model import build_model
from heavyranker.serve.export import export_model
from heavyranker.serve.repository import ModelRepository
from heavyranker.serve.scorer import Scorer

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.5
MODEL_NAME = "bench"
JSON = {"content-type": "application/json"}


@dataclass
class Answer:
    start: float
    end: float
    version: str | None  # None: failed


def export(
    config_path: str, seed: int, folder: Path, *, format: str = "onnx", precision: str = "fp32"
) -> Path:
    config = load_config(config_path)
    torch.manual_seed(seed)
    model = build_model(config.model, feature_specs(config.train_data), config.train_data.tasks)
    checkpoint = save_checkpoint(folder / f"checkpoints{seed}", 0, {"model": model.state_dict(), "step": 0})
    out = folder / f"model{seed}-{format}-{precision}"
    return export_model(config, checkpoint=str(checkpoint), out=str(out), format=format, precision=precision)


def publish(repository: ModelRepository, folder: Path) -> int:
    return repository.publish(lambda staging: shutil.copytree(folder, staging, dirs_exist_ok=True), keep=3)


def start_server(root: Path, threads: int, clients: int) -> tuple[subprocess.Popen, str]:
    options = ["--repository", str(root), "--model-name", MODEL_NAME, "--poll-seconds", str(POLL_S)]
    return launch_server([*options, "--max-queue", str(clients)], threads)


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no {field} in /proc/{pid}/status")


def client_loop(url: str, body: bytes, answers: list[Answer], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=300) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = client.post("/v1/rank", content=body, headers=JSON)
                version = response.json()["model_version"] if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                version = None
            answers.append(Answer(start, time.perf_counter(), version))


def phase(answers: list[Answer], seconds: float) -> dict[str, float]:
    latencies = np.array([a.end - a.start for a in answers]) * 1e3
    return {
        "requests": len(answers),
        "p50_ms": float(np.percentile(latencies, 50)) if len(answers) else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if len(answers) else float("nan"),
        "requests_per_s": len(answers) / seconds if seconds > 0 else float("nan"),
    }


def wait_for_version(answers: list[Answer], version: int, server: subprocess.Popen) -> float:
    """The end of the first response of `version`."""
    wanted = str(version)
    while True:
        ends = [a.end for a in list(answers) if a.version == wanted]
        if ends:
            return min(ends)
        if server.poll() is not None:
            raise SystemExit(f"the server stopped (exit code {server.poll()})")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "local_prod.yaml"))
    parser.add_argument("--candidates", type=int, default=100, help="per request")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--steady-s", type=float, default=20.0, help="seconds of steady state first")
    parser.add_argument("--swaps", type=int, default=5, help="versions published, one after another")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="the server's")
    add_results_option(parser, "serve_swap")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folders = [export(args.config, seed, Path(tmp)) for seed in (0, 1)]
        repository = ModelRepository(Path(tmp) / "repo", MODEL_NAME)
        publish(repository, folders[0])
        body = json_body(Scorer(folders[0]).inputs, args.candidates)
        server, url = start_server(repository.root, args.threads, args.clients)
        try:
            loaded_mib = memory_mib(server.pid, "VmRSS")
            answers: list[Answer] = []
            stop = threading.Event()
            clients = [
                threading.Thread(target=client_loop, args=(url, body, answers, stop))
                for _ in range(args.clients)
            ]
            for client in clients:
                client.start()
            begin = time.perf_counter()
            time.sleep(args.steady_s)
            steady_end = time.perf_counter()
            windows = []
            for i in range(args.swaps):
                published = time.perf_counter()
                version = publish(repository, folders[(i + 1) % 2])
                windows.append((published, wait_for_version(answers, version, server)))
            stop.set()
            for client in clients:
                client.join()
            peak_mib = memory_mib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait()

    steady = [a for a in answers if begin + 1 <= a.start and a.end <= steady_end]  # a second to settle
    during = [a for a in answers if any(a.start < end and a.end > start for start, end in windows)]
    window_s = sum(end - start for start, end in windows)
    figures = {
        "threads": args.threads,
        "steady": phase(steady, steady_end - begin - 1),
        "during_swaps": phase(during, window_s),
        "p99_during_swaps_over_steady": phase(during, window_s)["p99_ms"] / phase(steady, 1)["p99_ms"],
        "failed_requests": sum(a.version is None for a in answers),
        "swaps": args.swaps,
        "swap_window_s_median": statistics.median(end - start for start, end in windows),
        "server_rss_mib_one_version": loaded_mib,
        "server_peak_rss_mib": peak_mib,
    }
    for name, value in figures.items():
        print(f"{name}: {value}")
    write_results("serve_swap", figures, args)


if __name__ == "__main__":
    main()
