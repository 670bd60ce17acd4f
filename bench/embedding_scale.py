"""Large id tables at scale on 2 gloo processes: replicated (DDP, a full table on each rank) against sharded
by torchrec (training.embedding_sharding: torchrec), in one run, for each table size.

    .venv/bin/python bench/embedding_scale.py [--config configs/local_small.yaml] [--rows 1000000 10000000]
                                              [--dim 8]  [--batch 256] [--steps 10] [--threads 1]
                                              [--results PATH]

The model is the config's with two large tables of `rows` x `dim`, over meta__user_id and meta__author_id,
ids uniform over the rows (torchrec's planner puts one table on each rank). Per mode and size, 2 fresh
processes (so that each peak is its own) measure:
  lookup   the large table's vectors for a global batch (the sharded lookup's all-to-alls included)
  step     forward, backward and the run's Adam step (build_optimizer: Adam over every row, as training)
  memory   the larger rank's resident memory after 2 untimed steps (tables, gradients and Adam's two
           moments are allocated by then), its peak, and its tables' bytes. The sharded peak includes
           the full tables every rank builds before they are sharded (train/sharding.py).
Examples/s are global (both ranks' examples). Table memory per rank is ~2 tables x 4 x rows x dim x 4 bytes
replicated (weights, gradients, two moments), half that sharded: 2.4 GiB per rank at 10M rows and dim 8;
mind the machine's memory before asking for 100M rows. The summary goes to
bench/results/embedding_scale.json (--results).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from results import add_results_option, write_results

REPO = Path(__file__).resolve().parents[1]
MODES = ("replicated", "sharded")
TABLES = ("user", "author")  # a table over meta__<name>_id each
LOOKUP_ROUNDS = 20  # passes over the timed batches: a replicated lookup takes microseconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "local_small.yaml"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=8, help="a multiple of 4 (fbgemm's kernels)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (both ranks)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 untimed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    add_results_option(parser, "embedding_scale")
    args = parser.parse_args()
    figures: dict = {"threads_per_rank": args.threads, "ranks": 2}
    for rows in args.rows:
        by_mode = {mode: on_two_ranks(mode, rows, args) for mode in MODES}
        for mode, measured in by_mode.items():
            figures[f"{rows:,} rows, {mode}"] = measured
        replicated, sharded = by_mode["replicated"], by_mode["sharded"]
        figures[f"{rows:,} rows, sharded over replicated"] = {
            "lookup_examples_per_s": sharded["lookup_examples_per_s"] / replicated["lookup_examples_per_s"],
            "step_examples_per_s": sharded["step_examples_per_s"] / replicated["step_examples_per_s"],
            "rank_rss_mib": sharded["rank_rss_mib"] / replicated["rank_rss_mib"],
            "rank_peak_rss_mib": sharded["rank_peak_rss_mib"] / replicated["rank_peak_rss_mib"],
        }
        ratios = figures[f"{rows:,} rows, sharded over replicated"]
        print(
            f"{rows:,} rows, sharded over replicated: "
            + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items())
        )
    write_results("embedding_scale", figures, args)


def on_two_ranks(mode: str, rows: int, args: argparse.Namespace) -> dict[str, float]:
    """Rank 0's figures of `mode` at `rows`, measured by 2 fresh processes of a gloo group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("forkserver")
    # Fresh processes for each measurement, forked from a server that imported these once.
    context.set_forkserver_preload(["torch", "torchrec", "heavyranker.train.sharding", "torch._dynamo"])
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        ranks = [context.Process(target=rank_main, args=(r, port, mode, rows, args, out)) for r in range(2)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        failed = [r for r, process in enumerate(ranks) if process.exitcode != 0]
        if failed:
            code = ranks[failed[0]].exitcode
            raise SystemExit(f"{mode} at {rows:,} rows: rank {failed[0]} failed (exit {code})")
        return json.loads(out.read_text())


def rank_main(rank: int, port: int, mode: str, rows: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(args.threads)
    from heavyranker.config import load_config
    from heavyranker.data.columns import feature_specs
    from heavyranker.model import build_model
    from heavyranker.runtime import distributed_runtime
    from heavyranker.train.loss import build_loss
    from heavyranker.train.optim import build_optimizer
    from heavyranker.train.sharding import ShardedTables

    tables = [
        f"{{name: {name}, num_embeddings: {rows}, embedding_dim: {args.dim}, feature_name: meta__{name}_id}}"
        for name in TABLES
    ]
    config = load_config(args.config, [f"model.large_embeddings={{tables: [{', '.join(tables)}]}}"])
    specs = feature_specs(config.train_data)
    with distributed_runtime() as runtime:
        torch.manual_seed(0)
        model = build_model(config.model, specs, config.train_data.tasks)
        if mode == "sharded":
            sharded = ShardedTables(model, runtime)
            train_model, params = sharded.module, sharded.optimizer_view
            tables = sharded.table_params.values()

            def lookup(features: dict) -> object:
                return sharded.wrapper.large(features)
        else:
            train_model, params = runtime.wrap(model), model
            tables = [table.embedding.weight for table in model.large_embeddings.values()]

            def lookup(features: dict) -> object:
                return [t(features[t.feature_name]) for t in model.large_embeddings.values()]

        optimizer, _ = build_optimizer(config.optimizer, params)
        loss_fn = build_loss(config.model)
        tasks = len(config.model.tasks)
        batches = [random_batch(specs, args.batch // 2, rows, tasks, seed) for seed in range(args.steps + 2)]

        def step(features: dict, labels: torch.Tensor) -> None:
            logits = train_model(features)["logits"]
            loss, _ = loss_fn(logits, labels, torch.ones_like(labels))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for features, labels in batches[:2]:  # untimed: the first steps allocate gradients and moments
            step(features, labels)
        rss = resident_mib()
        with torch.no_grad():
            lookup_s = timed(lambda: [lookup(f) for _ in range(LOOKUP_ROUNDS) for f, _ in batches[2:]])
        step_s = timed(lambda: [step(f, y) for f, y in batches[2:]])
        examples = args.batch * args.steps
        figures = {
            "lookup_examples_per_s": examples * LOOKUP_ROUNDS / lookup_s,
            "step_examples_per_s": examples / step_s,
            "rank_rss_mib": max(runtime.gather(rss)),
            "rank_peak_rss_mib": max(
                runtime.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
            ),
            "rank_tables_mib": max(runtime.gather(sum(t.numel() * t.element_size() for t in tables) / 2**20)),
        }
        if runtime.is_main:
            out.write_text(json.dumps(figures))
        dist.barrier()  # neither rank leaves the group while the other still works


def random_batch(specs: dict, batch: int, rows: int, tasks: int, seed: int) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = {}
    for name, spec in specs.items():
        shape = (batch, *spec.shape)
        if name in ("meta__user_id", "meta__author_id"):
            features[name] = torch.randint(0, rows, shape, generator=generator)
        elif spec.dtype == torch.int64:
            features[name] = torch.randint(0, 300, shape, generator=generator)
        else:
            features[name] = torch.randn(shape, generator=generator).to(spec.dtype)
    return features, (torch.rand(batch, tasks, generator=generator) < 0.1).float()


def timed(work: Callable[[], object]) -> float:
    """Wall seconds of `work()` on every rank, from a common start to the last rank's end."""
    dist.barrier()
    start = time.perf_counter()
    work()
    dist.barrier()
    return time.perf_counter() - start


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
