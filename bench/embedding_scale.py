"""Large id tables at scale on 2 gloo processes: replicated (DDP, a full table on each rank), sharded by
torchrec (training.embedding_sharding: torchrec) and managed (replicated, with id_mapping: managed), in one
run, for each table size.

    .venv/bin/python bench/embedding_scale.py [--config configs/local_small.yaml] [--rows 1000000 10000000]
                                              [--dim 8]  [--batch 256] [--steps 10] [--threads 1]
                                              [--table-optimizer adam] [--managed-baseline REV]
                                              [--profile] [--results PATH]

The model is the config's with two large tables of `rows` x `dim`, over meta__user_id and meta__author_id,
ids uniform over the rows (torchrec's planner puts one table on each rank). Per mode and size, 2 fresh
processes (so that each peak is its own) measure:
  lookup   the large table's vectors for a global batch (the sharded lookup's all-to-alls included; the
           managed map's binary search, in eval mode: no counting)
  step     forward, backward and the optimizer step: the run's Adam over every row (build_optimizer, as
           training), or with --table-optimizer sgd | rowwise_adagrad the tables' own (optimizer.embedding)
           for replicated and managed. Sharded tables always train with the run's Adam (training refuses
           optimizer.embedding with them), so they carry Adam's two moments whatever the option says.
  memory   the larger rank's resident memory after 2 untimed steps (tables, gradients and optimizer state
           are allocated by then), its peak, and its tables' bytes. Sharded, the ranker is built as train
           builds it, without the large tables' rows: each rank allocates and fills its shards only.
A managed table starts full (every row and candidate entry taken: the steady state of a table far smaller
than the ids), with min_count 2 and lru; a batch's ids are 1/2 resident, 1/4 candidates (admitted, so each
evicts a row) and 1/4 new raw 64-bit ids (each evicts a candidate).
Examples/s are global (both ranks' examples). Before a size, each mode's peak per rank is extrapolated
linearly from its two largest sizes measured; a mode whose 2 ranks would need more than 60% of the memory
available (other work shares the machine) is skipped, and so is a mode after a rank of it failed (the OOM
killer's SIGKILL); the figure says which and why. --managed-baseline REV also times a managed map's
counting step alone (one process, one full table, sizes up to 10M rows; lru and lfu from the start and
from a long run's steady state) with id_managed.py as at git revision REV against the
current one, side by side, over enough steps to include merges of the recent parts of its sorted ids.
--profile prints where rank 0's timed steps spend their time (cProfile; it slows them a little), and adds
the counting step's time in changing its sorted ids. The
summary goes to bench/results/embedding_scale.json (--results), rewritten after each size.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib.util
import json
import multiprocessing
import os
import pstats
import resource
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from results import add_results_option, write_results

REPO = Path(__file__).resolve().parents[1]
MODES = ("replicated", "sharded", "managed")
TABLES = ("user", "author")  # a table over meta__<name>_id each
LOOKUP_ROUNDS = 20  # passes over the timed batches: a replicated lookup takes microseconds
MEMORY_SHARE = 0.6  # of the memory available, what a mode's 2 ranks may be predicted to take
BASELINE_MAX_ROWS = 10_000_000  # the counting step before issue 26's rewrite took ~20 s at 10M rows
BASELINE_SIBLINGS = ("sorted_index",)  # modules of model/ holding part of the managed map's code at some rev
PROFILE_LINES = 12  # functions listed by --profile, by their own time
MIXER = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15: odd, so i -> i * MIXER is a bijection of int64


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
    parser.add_argument(
        "--table-optimizer",
        default="adam",
        choices=["adam", "sgd", "rowwise_adagrad"],
        help="adam: the run's Adam over every parameter; else optimizer.embedding (replicated, managed)",
    )
    parser.add_argument("--managed-baseline", metavar="REV", help="git revision of the counting to compare")
    parser.add_argument(
        "--profile", action="store_true", help="print rank 0's cProfile of each mode's timed steps"
    )
    add_results_option(parser, "embedding_scale")
    args = parser.parse_args()
    figures: dict = {"threads_per_rank": args.threads, "ranks": 2}
    peaks: dict[str, list[tuple[int, float]]] = {mode: [] for mode in MODES}
    for rows in sorted(args.rows):
        by_mode = {}
        for mode in MODES:
            too_big = predicted_too_big(peaks[mode], rows)
            if too_big:
                print(f"{rows:,} rows, {mode}: skipped, {too_big}")
                figures[f"{rows:,} rows, {mode}"] = {"skipped": too_big}
                continue
            measured = figures[f"{rows:,} rows, {mode}"] = on_two_ranks(mode, rows, args)
            if "failed" in measured:
                peaks[mode].append((rows, float("inf")))  # no larger size of this mode is tried
                continue
            by_mode[mode] = measured
            peaks[mode].append((rows, by_mode[mode]["rank_peak_rss_mib"]))
        for mode in ("sharded", "managed"):
            if mode in by_mode and "replicated" in by_mode:
                figures[f"{rows:,} rows, {mode} over replicated"] = ratios(
                    by_mode[mode], by_mode["replicated"]
                )
        if args.managed_baseline and rows <= BASELINE_MAX_ROWS:
            figures[f"{rows:,} rows, managed counting step"] = counting_before_after(
                args.managed_baseline, rows, args
            )
        write_results("embedding_scale", figures, args)  # after each size: a later one may not end


def ratios(mode: dict[str, float], replicated: dict[str, float]) -> dict[str, float]:
    keys = ("lookup_examples_per_s", "step_examples_per_s", "rank_rss_mib", "rank_peak_rss_mib")
    return {key: mode[key] / replicated[key] for key in keys}


def predicted_too_big(measured: list[tuple[int, float]], rows: int) -> str | None:
    """Why 2 ranks of a mode would not fit at `rows` (its peak per rank extrapolated from its two largest
    sizes), or None."""
    if measured and measured[-1][1] == float("inf"):
        return f"it failed at {measured[-1][0]:,} rows"
    if len(measured) < 2:
        return None
    (small, small_peak), (large, large_peak) = measured[-2:]
    predicted = large_peak + (large_peak - small_peak) / (large - small) * (rows - large)
    available = available_mib()
    if 2 * predicted <= MEMORY_SHARE * available:
        return None
    return (
        f"predicted peak {predicted:,.0f} MiB per rank (from {small:,} and {large:,} rows) x 2 ranks > "
        f"{MEMORY_SHARE:.0%} of the {available:,.0f} MiB available"
    )


def on_two_ranks(mode: str, rows: int, args: argparse.Namespace) -> dict[str, float]:
    """Rank 0's figures of `mode` at `rows`, measured by 2 fresh processes of a gloo group."""
    # The group's store lives here, on a port it holds from the start: a free port found and closed first
    # could be taken by another process before rank 0 binds it (seen once in CI, with the suite's workers).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    context = multiprocessing.get_context("forkserver")
    # Fresh processes for each measurement, forked from a server that imported these once.
    context.set_forkserver_preload(["torch", "torchrec", "heavyranker.train.sharding", "torch._dynamo"])
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "figures.json"
        ranks = [context.Process(target=rank_main, args=(r, port, mode, rows, args, out)) for r in range(2)]
        for process in ranks:
            process.start()
        while all(process.exitcode is None for process in ranks):  # until one ends
            time.sleep(1)
        first = [(r, process.exitcode) for r, process in enumerate(ranks) if process.exitcode is not None]
        for process in ranks:  # a rank that died (the OOM killer's SIGKILL) leaves the other in a collective
            process.join(timeout=300 if all(code == 0 for _, code in first) else 0)
            if process.exitcode is None:
                process.kill()
                process.join()
        failed = [(r, process.exitcode) for r, process in enumerate(ranks) if process.exitcode != 0]
        if failed:
            # The rank that ended first says why; the other may only have been killed here, after it.
            rank, code = next(((r, c) for r, c in first if c != 0), failed[0])
            why = " (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""
            codes = ", ".join(f"rank {r}: {process.exitcode}" for r, process in enumerate(ranks))
            print(f"{mode} at {rows:,} rows: rank {rank} failed, exit {code}{why} (exit codes: {codes})")
            return {"failed": f"rank {rank} exited with {code}{why}"}
        return json.loads(out.read_text())


def rank_main(rank: int, port: int, mode: str, rows: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True")  # both ranks join the parent's store as clients
    torch.set_num_threads(args.threads)
    from heavyranker.config import load_config
    from heavyranker.data.columns import feature_specs
    from heavyranker.model import build_model
    from heavyranker.runtime import distributed_runtime
    from heavyranker.train.loss import build_loss
    from heavyranker.train.optim import build_optimizer
    from heavyranker.train.sharding import ShardedTables
    from heavyranker.train.table_optim import build_table_optimizer

    config = load_config(args.config, overrides(mode, rows, args))
    specs = feature_specs(config.train_data)
    with distributed_runtime() as runtime:
        torch.manual_seed(0)
        allocate = mode != "sharded"  # sharded: built as train builds it, the shards filled by each rank
        model = build_model(config.model, specs, config.train_data.tasks, allocate_large_tables=allocate)
        managed = None
        if mode == "managed":
            for table in model.large_embeddings.values():
                managed = fill_managed(table.mapping, rows)
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

        optimizers = [build_optimizer(config.optimizer, params)[0]]
        optimizers += [o for o in [build_table_optimizer(config.optimizer, list(tables))] if o is not None]
        loss_fn = build_loss(config.model)
        tasks = len(config.model.tasks)
        batches = [
            random_batch(specs, args.batch // 2, rows, tasks, seed, managed) for seed in range(args.steps + 2)
        ]

        def step(features: dict, labels: torch.Tensor) -> None:
            logits = train_model(features)["logits"]
            loss, _ = loss_fn(logits, labels, torch.ones_like(labels))
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        for features, labels in batches[:2]:  # untimed: the first steps allocate gradients and moments
            step(features, labels)
        rss = resident_mib()
        with torch.no_grad():
            model.eval()  # a lookup, as in serving: a managed map is searched, not counted
            lookup_s = timed(lambda: [lookup(f) for _ in range(LOOKUP_ROUNDS) for f, _ in batches[2:]])
            model.train()
        profile = cProfile.Profile() if args.profile else None
        step_s = timed(lambda: profiled(profile, lambda: [step(f, y) for f, y in batches[2:]]))
        if profile is not None and runtime.is_main:
            print(f"{mode} at {rows:,} rows, rank 0's timed steps:")
            pstats.Stats(profile).sort_stats("tottime").print_stats(PROFILE_LINES)
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
        # Then leave at once, without tearing the gloo group down: that teardown hung the later rank for
        # good, after the other had exited, in about 1 run in 4 under load (strace: killed here 300 s later).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def overrides(mode: str, rows: int, args: argparse.Namespace) -> list[str]:
    """The config overrides of a mode: its two large tables, and the tables' own optimizer if any."""
    mapping = ", id_mapping: managed, min_count: 2, eviction: lru" if mode == "managed" else ""
    tables = [
        f"{{name: {name}, num_embeddings: {rows}, embedding_dim: {args.dim}, feature_name: meta__{name}_id"
        f"{mapping}}}"
        for name in TABLES
    ]
    chosen = [f"model.large_embeddings={{tables: [{', '.join(tables)}]}}"]
    if args.table_optimizer != "adam" and mode != "sharded":
        chosen.append(f"optimizer.embedding={{type: {args.table_optimizer}, learning_rate: 0.01}}")
    return chosen


def fill_managed(mapping: torch.nn.Module, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Takes every row and candidate entry of a fresh managed map, by distinct raw 64-bit ids (rows - 1
    resident, seen twice; rows candidates, seen once), all last seen at batch 1; returns its resident ids
    and its candidates (views of its buffers). Written into the buffers in place: a full state built beside
    them and loaded (as before) took 0.9 GiB of temporaries for a 10M-row table, and the process kept 230
    MiB of it after the load."""
    state = {name: buffer.numpy() for name, buffer in mapping.state_dict().items()}  # shares their memory
    resident, candidates = state["row_ids"], state["candidate_ids"]
    resident[:], candidates[:] = np.arange(rows), np.arange(rows, 2 * rows)
    for ids in (resident, candidates):  # wraps around: distinct, over the whole int64 range
        np.multiply(ids, MIXER, out=ids)
    state["row_used"][:], state["row_used"][0] = True, False
    state["row_count"][:], state["row_last"][:] = 2, 1
    state["candidate_used"][:], state["candidate_count"][:], state["candidate_last"][:] = True, 1, 1
    order = np.argsort(resident[1:])
    np.take(resident[1:], order, out=state["sorted_ids"][:-1])
    np.add(order, 1, out=state["sorted_rows"][:-1])
    state["sorted_ids"][-1] = state["sorted_rows"][-1] = 0
    state["num_resident"][...], state["tick"][...] = rows - 1, 1
    return resident[1:], candidates


def counting_before_after(rev: str, rows: int, args: argparse.Namespace) -> dict[str, float]:
    """A full managed map's counting step (its forward in training, on a global batch's ids) with
    id_managed.py as at `rev` and as now, on the same batches, in this process: from the bench's start
    (every entry last seen at batch 1, with the same count), from a long run's steady state (last sightings
    spread over past batches, as many a batch as it touches), and both with lfu eviction. The mean
    over enough steps to fill the recent parts of the sorted ids twice (each full one is merged into the main
    part: the amortized cost), the slowest step, and the lookup alone (eval) of the same batches after; with
    --profile, the time its changes of the sorted ids took (a step's share)."""
    from heavyranker.config.embeddings import Eviction
    from heavyranker.model.id_managed import ManagedMapping, recent_capacity

    torch.set_num_threads(args.threads)
    admitted = max(1, args.batch // 4)  # a step's ids that are admitted (and as many new candidates)
    steps = max(args.steps, 2 * recent_capacity(rows) // admitted + 1)
    ms: dict[str, float] = {"steps": steps}
    states = ("start", "steady", "lfu_start", "lfu_steady")
    for state, eviction in zip(states, (Eviction.LRU, Eviction.LRU, Eviction.LFU, Eviction.LFU), strict=True):
        for name, mapping_class in (("before", baseline_mapping(rev)), ("after", ManagedMapping)):
            mapping = mapping_class(rows, 2, eviction, -1)
            managed = fill_managed(mapping, rows)
            if state.endswith("steady"):
                spread_sightings(mapping, rows, args.batch, spread_counts=eviction == Eviction.LFU)
            batches = [managed_ids((args.batch, 1), seed, *managed) for seed in range(steps + 1)]
            mapping(batches[0])  # untimed: the first count builds the indexes of the buffers
            each, profile = [], cProfile.Profile() if args.profile else None
            for ids in batches[1:]:
                start = time.perf_counter()
                profiled(profile, functools.partial(mapping, ids))
                each.append(time.perf_counter() - start)
            ms[f"{state}_{name}"], ms[f"{state}_{name}_slowest"] = np.mean(each) * 1e3, np.max(each) * 1e3
            if profile is not None:
                ms[f"{state}_{name}_sorted_ids_changes"] = changes_seconds(profile) / steps * 1e3
            mapping.eval()  # then the same batches' lookup alone, in the map they left
            start = time.perf_counter()
            for ids in batches[1:]:
                mapping.lookup(ids)
            ms[f"{state}_lookup_{name}"] = (time.perf_counter() - start) / steps * 1e3
            del mapping, managed
        for kind in ("", "lookup_"):
            ms[f"{state}_{kind}before_over_after"] = ms[f"{state}_{kind}before"] / ms[f"{state}_{kind}after"]
        print(
            f"{rows:,} rows, managed counting step ({state}, mean of {steps}): "
            f"{ms[f'{state}_before']:.3g} ms before, {ms[f'{state}_after']:.3g} ms after (slowest "
            f"{ms[f'{state}_before_slowest']:.3g} and {ms[f'{state}_after_slowest']:.3g} ms); the lookup "
            f"alone: {ms[f'{state}_lookup_before']:.3g} and {ms[f'{state}_lookup_after']:.3g} ms"
        )
    return ms


def changes_seconds(profile: cProfile.Profile) -> float:
    """The time a profiled count spent changing its sorted ids: in the outermost `replace` (SortedIndex's
    before the recent parts, SplitIndex's after, merges included)."""
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    return max(
        (cumulative for (_, _, name), (*_, cumulative, _) in stats.items() if name == "replace"), default=0
    )


def spread_sightings(mapping: torch.nn.Module, rows: int, batch: int, spread_counts: bool = False) -> None:
    """Every row and candidate last seen at a random one of the past batches, each touching 3/4 of its
    ids' rows (1/2 resident, 1/4 admitted): a full lru table after a long run, where the oldest batch
    holds fewer entries than a batch evicts. spread_counts (lfu): each resident id seen 2 times (half of
    them), 3 (a quarter), ... (candidates stay at 1: min_count 2 admits them at their second sighting)."""
    batches = max(1, rows // max(1, batch * 3 // 4))
    rng = np.random.default_rng(0)
    for name in ("row_last", "candidate_last"):
        getattr(mapping, name).copy_(torch.from_numpy(rng.integers(1, batches + 1, rows)))
    if spread_counts:
        mapping.row_count[1:] = torch.from_numpy(1 + rng.geometric(0.5, rows - 1))
    mapping.tick.fill_(batches)


def baseline_mapping(rev: str) -> type:
    """ManagedMapping as src/heavyranker/model/id_managed.py was at git revision `rev`, with the sibling
    modules it imports that hold the map's code (BASELINE_SIBLINGS) as they were then too."""
    source = revision_source(rev, "id_managed")
    assert source is not None
    for sibling in BASELINE_SIBLINGS:
        if f"from .{sibling} import" in source:
            load_baseline(f"{sibling}_baseline", revision_source(rev, sibling) or "")
            source = source.replace(f"from .{sibling} import", f"from .{sibling}_baseline import")
    return load_baseline("id_managed_baseline", source).ManagedMapping


def revision_source(rev: str, module: str) -> str | None:
    """src/heavyranker/model/<module>.py at git revision `rev`, if there was one."""
    shown = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:src/heavyranker/model/{module}.py"],
        capture_output=True,
        text=True,
    )
    return shown.stdout if shown.returncode == 0 else None


def load_baseline(name: str, source: str) -> types.ModuleType:
    """`source` as the module heavyranker.model.<name>: its relative imports resolve in heavyranker.model."""
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"heavyranker.model.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for the relative import of the module that loads it next
    spec.loader.exec_module(module)
    return module


def random_batch(
    specs: dict, batch: int, rows: int, tasks: int, seed: int, managed: tuple[np.ndarray, np.ndarray] | None
) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = {}
    for name, spec in specs.items():
        shape = (batch, *spec.shape)
        if name in ("meta__user_id", "meta__author_id"):
            features[name] = torch.randint(0, rows, shape, generator=generator)
            if managed is not None:
                features[name] = managed_ids(shape, seed, *managed)
        elif spec.dtype == torch.int64:
            features[name] = torch.randint(0, 300, shape, generator=generator)
        else:
            features[name] = torch.randn(shape, generator=generator).to(spec.dtype)
    return features, (torch.rand(batch, tasks, generator=generator) < 0.1).float()


def managed_ids(
    shape: tuple[int, ...], seed: int, resident: np.ndarray, candidates: np.ndarray
) -> torch.Tensor:
    """1/2 resident ids, 1/4 candidates (admitted on this sighting) and 1/4 ids never seen."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    quarter = size // 4
    ids = np.concatenate(
        [
            rng.choice(resident, size - 2 * quarter),
            rng.choice(candidates, quarter),
            rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, quarter),
        ]
    )
    return torch.from_numpy(rng.permutation(ids).reshape(shape))


def profiled(profile: cProfile.Profile | None, work: Callable[[], object]) -> object:
    """work(), under `profile` if any."""
    return work() if profile is None else profile.runcall(work)


def timed(work: Callable[[], object]) -> float:
    """Wall seconds of `work()` on every rank, from a common start to the last rank's end."""
    dist.barrier()
    start = time.perf_counter()
    work()
    dist.barrier()
    return time.perf_counter() - start


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**10


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


if __name__ == "__main__":
    main()
