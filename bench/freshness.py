"""End-to-end freshness: the seconds from a record landing in Kafka (the producer's flush returned) to the
moment `serve --repository` answers with a version trained on it, at p50 / p99 over --arrivals arrivals,
with the three parts that add up to it: landed -> trained (the end of the first step that includes it),
trained -> published (the steps up to the next promotion, then the promotion: both models scored on the
held-out split, the candidate exported), published -> served (the server's next poll, load and warm-up);
and a promotion's own seconds (its candidate's step to its READY), during which training waits.

A tansu broker on loopback, one topic of one partition; `train --follow` on configs/local_small.yaml with
batches of --batch records and `training.promote` every --every-steps steps into a local repository (run by
tests/train/kafka_train_run.py, which logs each step's end and the ids it trained on, with the Promoter
given to train() as `heavyranker train` gives it); `heavyranker serve --repository` polling every
--poll-seconds; a client reading /v1/model's model_version every 20 ms. Every --interval seconds, --batch
new records land (one step's worth). The promotion's rule is the default one with --tolerance: a tolerance
past any loss (the default) measures the pipeline, not the gate (a refused candidate waits for the next).

python bench/freshness.py [--arrivals 48] [--interval 1] [--batch 2] [--every-steps 16] [--poll-seconds 1]"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import httpx  # noqa: E402
from results import add_results_option, write_results  # noqa: E402
from serve_latency import launch_server  # noqa: E402

from heavyranker.config import load_config  # noqa: E402
from heavyranker.data.synthetic import generate_for_config  # noqa: E402
from heavyranker.serve.repository import ModelRepository  # noqa: E402
from tests.kafka_broker import running_broker  # noqa: E402
from tests.kafka_data import example  # noqa: E402
from tests.train.test_kafka_training import overrides, wait_for  # noqa: E402

CONFIG = ROOT / "configs" / "local_small.yaml"
MODEL_NAME = "fresh"
SPLITS = ("validation", "validation_downsampled")  # local_small's
WATCH_S = 0.02  # between two looks of the client at the served version
RUNNER = """
import sys
from heavyranker.release.follow import Promoter
from heavyranker.train import loop
import tests.train.kafka_train_run as run

train = loop.train
loop.train = lambda config, **kw: train(config, on_checkpoint=Promoter(config), **kw)
run.main(sys.argv[1], sys.argv[2:])
"""


def start_training(log: Path, settings: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(log), *settings],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Watcher(threading.Thread):
    """Reads the served version every WATCH_S seconds; `first_seen`: version -> when it was first answered."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.first_seen, self.stop = url, {}, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url) as client:
            while not self.stop.is_set():
                version = int(client.get("/v1/model").json()["model_version"])
                self.first_seen.setdefault(version, time.time())
                time.sleep(WATCH_S)


def quantiles(values: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return {"p50": cuts[49], "p99": cuts[98], "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrivals", type=int, default=48)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between arrivals")
    parser.add_argument("--batch", type=int, default=2, help="records per batch and per arrival")
    parser.add_argument("--every-steps", type=int, default=16, help="training.promote.every_steps")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="serve's --poll-seconds")
    parser.add_argument("--tolerance", type=float, default=1e6, help="of the promotion rule (RCE points)")
    parser.add_argument("--validation-examples", type=int, default=1000, help="the held-out split's size")
    add_results_option(parser, "freshness")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    with running_broker() as broker, tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_for_config(
            load_config(CONFIG), out=str(root / "data"), examples=args.validation_examples, files=1, seed=0
        )
        repository = ModelRepository(root / "repo", MODEL_NAME)
        broker.create_topic("fresh", 1)
        promote = (
            f"training.promote={{repository: {repository.root}, model_name: {MODEL_NAME}, format: pt2, "
            f"every_steps: {args.every_steps}, resamples: 100, tolerance: {args.tolerance}, "
            "keep_versions: 1000}"
        )
        settings = overrides(broker.bootstrap, "fresh", root / "run")
        settings = [s for s in settings if s != "validation_data={}"] + [
            "training.follow=true",
            f"training.checkpoint_every_n={args.every_steps}",
            "training.train_log_every_n=1000",
            "training.eval_log_every_n=1000000",
            f"train_data.global_batch_size={args.batch}",
            *(f"validation_data.{split}.inputs={root}/data/{split}/*.gz" for split in SPLITS),
            promote,
        ]
        log = root / "trained.log"
        run = start_training(log, settings)
        # Warm up: the steps of the first promotion, which gives the server its first version.
        first = [example(i) for i in range(args.batch * args.every_steps)]
        broker.produce("fresh", {0: first})
        wait_for(lambda: repository.versions() != [], "the first version", limit=600)
        server, url = launch_server(
            [
                "--repository",
                str(repository.root),
                "--model-name",
                MODEL_NAME,
                "--poll-seconds",
                str(args.poll_seconds),
            ],
            threads=1,
        )
        watcher = Watcher(url)
        watcher.start()
        landed: dict[int, float] = {}
        start = len(first)
        for arrival in range(args.arrivals):
            ids = range(start + arrival * args.batch, start + (arrival + 1) * args.batch)
            broker.produce("fresh", {0: [example(i) for i in ids]})
            landed.update(dict.fromkeys(ids, time.time()))
            time.sleep(args.interval)
        # Records that fill the last promotion's steps, then wait until a version trained on every arrival
        # is served.
        tail = start + args.arrivals * args.batch
        broker.produce("fresh", {0: [example(i) for i in range(tail, tail + args.batch * args.every_steps)]})
        trained_step: dict[int, int] = {}

        def all_served() -> bool:
            trained_step.update(first_steps(log))
            steps = [version_step(repository, v) for v in watcher.first_seen]
            return all(i in trained_step for i in landed) and max(steps) >= max(
                trained_step[i] for i in landed
            )

        wait_for(all_served, "a served version trained on every arrival", limit=900)
        watcher.stop.set()
        watcher.join()
        server.send_signal(signal.SIGTERM)
        run.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
        run.wait(timeout=300)
        step_ended = step_end_times(log)
        versions = {v: (version_step(repository, v), repository.published(v)) for v in watcher.first_seen}
        decisions = repository.decisions()
    parts: dict[str, list[float]] = {
        "total": [],
        "landed_to_trained": [],
        "trained_to_published": [],
        "published_to_served": [],
    }
    for record, t in landed.items():
        step = trained_step[record]
        version = min(v for v, (s, _) in versions.items() if s >= step)
        published, served = versions[version][1], watcher.first_seen[version]
        parts["total"].append(served - t)
        parts["landed_to_trained"].append(step_ended[step] - t)
        parts["trained_to_published"].append(published - step_ended[step])
        parts["published_to_served"].append(served - published)
    promotions = [d for d in decisions if d["published"]]
    # A promotion's own time: from the end of its candidate's step to its READY (scoring both, exporting).
    promotion = [published - step_ended[step] for step, published in versions.values() if step in step_ended]
    figures = {
        "freshness_seconds": quantiles(parts.pop("total")),
        **{f"{name}_seconds": quantiles(values) for name, values in parts.items()},
        "promotion_seconds": quantiles(promotion) if len(promotion) > 1 else None,
        "promotions": {
            "published": len(promotions),
            "refused": len(decisions) - len(promotions),
            "seconds_between_published_median": statistics.median(
                b["time"] - a["time"] for a, b in zip(promotions, promotions[1:], strict=False)
            )
            if len(promotions) > 1
            else None,
        },
        "records": len(landed),
        # The machine's load while it ran (a shared machine: steps slow down as it rises).
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
    }
    print(json.dumps(figures, indent=2))
    write_results("freshness", figures, args)


def first_steps(log: Path) -> dict[int, int]:
    """tweet id -> the first step that trained on it."""
    found: dict[int, int] = {}
    for line in log.read_text().splitlines() if log.exists() else ():
        kind, number, _, *ids = line.split() + [""]
        if kind == "step":
            for tweet_id in filter(None, ids):
                found.setdefault(int(tweet_id), int(number))
    return found


def step_end_times(log: Path) -> dict[int, float]:
    """step -> when it ended (the first run's: the bench does not restart the training)."""
    ended: dict[int, float] = {}
    for line in log.read_text().splitlines():
        kind, number, when, *_ = line.split() + ["", ""]
        if kind == "step":
            ended.setdefault(int(number), float(when))
    return ended


def version_step(repository: ModelRepository, version: int) -> int:
    manifest = json.loads((repository.version_folder(version) / "manifest.json").read_text())
    return int(manifest["checkpoint"]["step"])


if __name__ == "__main__":
    main()
