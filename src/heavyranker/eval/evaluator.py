"""Evaluation: per-task metrics of a model on each validation split, for one checkpoint or, with
--watch, for every checkpoint a training run writes."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext

import torch

from ..atomic import atomic_write, refuse_link
from ..checkpoint import resolve_checkpoint
from ..config import Config, short_names
from ..config.data import DataConfig
from ..data.batch import Batch
from ..data.columns import feature_specs
from ..data.dataset import RecapDataset, describe_counts, total_counts
from ..data.sources.files import check_sharding, with_end_pinned
from ..errors import SettingError, UserError
from ..memory import out_of_memory_as_user_error
from ..model import Ranker, build_model, restore_weights
from ..run_folder import RunFolder
from ..runtime import Runtime, distributed_runtime
from .metrics import MetricAccumulator, gather_metrics

log = logging.getLogger(__name__)

Results = dict[str, dict[str, dict[str, float]]]  # split -> task (or task/stratifier) -> metric -> value
POLL_SECONDS = 2.0
Scored = Iterable[tuple[Batch, dict[str, torch.Tensor]]]  # each batch (on the device), the model's outputs
# How an evaluation scores a rank's batches: by default each rank by itself, model(features); with sharded
# tables every rank in step (train/sharded_eval.py). A context: an error in between reaches the others.
Scoring = Callable[[Iterable[Batch]], AbstractContextManager[Scored]]


def evaluation_tasks(config: Config, data: DataConfig) -> list[str]:
    return list(data.evaluation_tasks) or config.task_names


@torch.no_grad()
def evaluate_split(
    config: Config, model: Ranker, data: DataConfig, runtime: Runtime, scoring: Scoring | None = None
) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """num_eval_steps batches of the split in order (all of it when < 0), weighted by the split's own weights.
    Metrics use the calibrated probabilities, so a downsampled split measures the population. Returns the
    metrics and what reading met (RecapDataset.counts(), all ranks' together). `scoring`: see Scoring."""
    tasks = evaluation_tasks(config, data)
    model_columns = [model.task_names.index(t) for t in tasks]
    stratifiers = config.model.stratifiers or []
    overall = MetricAccumulator(len(tasks))
    strata = [MetricAccumulator(len(tasks)) for _ in stratifiers]
    limit = config.training.num_eval_steps
    # Rank 0 finds a `latest` end, for every rank: each finding its own, a folder landing in between would
    # give the ranks other folders, and a files[rank::world] share of other lists.
    data = runtime.broadcast(with_end_pinned(data) if runtime.is_main else data)
    with RecapDataset(
        data, seed=config.training.seed, rank=runtime.rank, world_size=runtime.world_size
    ) as dataset:
        batches = _first(dataset, limit)
        with scoring(batches) if scoring else nullcontext(_scored(model, batches, runtime)) as scored:
            for batch, outputs in scored:
                probs = outputs["calibrated_probabilities"][:, model_columns].float().cpu()
                columns = batch.columns(tasks)
                labels, weights = batch.labels[:, columns].cpu(), batch.weights[:, columns].cpu()
                overall.add(labels, probs, weights)
                for stratifier, accumulator in zip(stratifiers, strata, strict=True):
                    keep = (batch.features["discrete"][:, stratifier.index] == stratifier.value).cpu()
                    accumulator.add(labels[keep], probs[keep], weights[keep])
        counts = total_counts(runtime.gather(dataset.counts()))
    # Each rank read its own files: the metrics are those of all ranks' examples together.
    overall, strata = gather_metrics(overall, runtime), [gather_metrics(a, runtime) for a in strata]
    results = overall.compute(tasks)
    for stratifier, accumulator in zip(stratifiers, strata, strict=True):
        for task, metrics in accumulator.compute(tasks).items():
            results[f"{task}/{stratifier.name}"] = metrics
    return results, counts


def _first(batches: Iterable[Batch], limit: int) -> Iterator[Batch]:
    """The first `limit` batches (all when < 0)."""
    for i, batch in enumerate(batches):
        if 0 <= limit <= i:
            break
        yield batch


def _scored(model: Ranker, batches: Iterable[Batch], runtime: Runtime) -> Scored:
    for batch in batches:
        batch = batch.to(runtime.device)
        yield batch, model(batch.features)


def evaluate_splits(
    config: Config,
    model: Ranker,
    step: int,
    runtime: Runtime,
    only: str | None = None,
    scoring: Scoring | None = None,
) -> Results:
    """Evaluate each validation split (or `only`); write eval/<split>/step_<N>.json; print a table. What
    reading met is logged when anything was, and written to the JSON under "data". `scoring`: see Scoring."""
    check_split(config, only)
    results: Results = {}
    for split, data in config.validation_data.items():
        if only is None or split == only:
            results[split], counts = evaluate_split(config, model, data, runtime, scoring)
            if runtime.is_main:
                if any(counts.values()):
                    log.info("evaluation of %s: %s", split, describe_counts(counts))
                _write(config, split, step, results[split], counts)
    if runtime.is_main:
        print(format_table(results, step))
    return results


def check_split(config: Config, split: str | None) -> None:
    if split is not None and split not in config.validation_data:
        raise UserError(f"no validation split {split!r} (the config has {', '.join(config.validation_data)})")


def format_table(results: Results, step: int) -> str:
    columns = ("auroc", "rce", "nrce", "ctr", "pctr", "loss", "num_examples", "num_positives")
    short = short_names([task for tasks in results.values() for task in tasks])
    width = max(map(len, short.values()), default=4)
    rows = [
        f"evaluation at step {step}",
        f"{'split':<24} {'task':<{width}} " + " ".join(f"{c:>13}" for c in columns),
    ]
    for split, tasks in results.items():
        for task, metrics in tasks.items():
            values = " ".join(f"{metrics[c]:>13.5g}" for c in columns)
            rows.append(f"{split[:24]:<24} {short[task]:<{width}} {values}")
    return "\n".join(rows)


def _write(
    config: Config, split: str, step: int, metrics: dict[str, dict[str, float]], counts: dict[str, int]
) -> None:
    path = refuse_link(RunFolder(config.training.save_dir).result(split, step))
    path.parent.mkdir(parents=True, exist_ok=True)
    strict = {task: {k: (None if math.isnan(v) else v) for k, v in m.items()} for task, m in metrics.items()}
    with atomic_write(path, "w") as f:  # a result file is complete or absent: a restarted --watch trusts it
        f.write(json.dumps({"step": step, "split": split, "metrics": strict, "data": counts}, indent=1))


def evaluate_command(
    config: Config, *, checkpoint: str | None, watch: bool, split: str | None
) -> Results | None:
    check_split(config, split)  # before --watch waits, maybe an hour, for a checkpoint to evaluate it on
    with distributed_runtime() as runtime:
        check_sharding(config.validation_sections, runtime.world_size)
        specs = feature_specs(config.train_data)
        model = build_model(config.model, specs, config.train_data.tasks).to(runtime.device).eval()
        if watch:
            if runtime.distributed:
                raise SettingError(
                    "watch",
                    "runs in one process (without torchrun); with torchrun, evaluate one checkpoint: the "
                    "one given, or the newest by default",
                )
            with out_of_memory_as_user_error(batch_setting(split), "evaluating checkpoints"):
                watch_checkpoints(config, model, runtime, split)
            return None
        # Every rank evaluates the checkpoint rank 0 found, even if a newer one appears meanwhile.
        path = runtime.broadcast(resolve_checkpoint(checkpoint or config.training.save_dir))
        hint = "a checkpoint of another model: give the config it was trained with, or --checkpoint"
        state = restore_weights(model, path, misfit_hint=hint, mapped=True)
        with out_of_memory_as_user_error(batch_setting(split), f"evaluating {path}"):
            return evaluate_splits(config, model, int(state["step"]), runtime, split)


def batch_setting(split: str | None) -> str:
    """The setting to lower when evaluating `split` (every split: None) runs out of memory."""
    return f"validation_data.{split or '<split>'}.global_batch_size"


def watch_checkpoints(
    config: Config, model: Ranker, runtime: Runtime, split: str | None, poll_seconds: float = POLL_SECONDS
) -> list[int]:
    """Evaluate each checkpoint once, as it appears. A checkpoint counts as done when every split it is
    evaluated on has its result file, so a restarted evaluator skips it. Stops after the checkpoint at
    num_train_steps, or after eval_timeout_in_s with no new checkpoint. Returns the steps evaluated."""
    splits = [split] if split else list(config.validation_data)
    run = RunFolder(config.training.save_dir)
    evaluated: list[int] = []
    last_new = time.monotonic()
    while True:
        found = run.list_checkpoints()
        for step, path in found:
            if all(run.result(s, step).exists() for s in splits):
                continue
            try:
                restore_weights(model, path, mapped=True)
            except UserError:
                if not path.exists():  # pruned by the trainer's checkpoint_max_to_keep meanwhile
                    continue
                raise
            evaluate_splits(config, model, step, runtime, split)
            evaluated.append(step)
            last_new = time.monotonic()
        if found and found[-1][0] >= config.training.num_train_steps:
            return evaluated
        if time.monotonic() - last_new > config.training.eval_timeout_in_s:
            log.info("no new checkpoint for %.0f s: stopping", config.training.eval_timeout_in_s)
            return evaluated
        time.sleep(poll_seconds)
