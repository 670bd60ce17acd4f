"""The training loop: data -> model -> multi-task loss -> Adam, with logging, evaluation and
checkpoints that a restarted run resumes from exactly."""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from ..config import Config, short_names
from ..config.training import TrainingConfig
from ..data.batch import Batch
from ..data.columns import feature_specs
from ..data.dataset import RecapDataset, describe_counts, total_counts
from ..data.sources.files import check_sharding
from ..data.sources.follow import follow_sources, restore_position
from ..errors import UserError
from ..eval.evaluator import evaluate_splits
from ..model import Ranker, build_model, restore_weights
from ..run_folder import RunFolder
from ..runtime import Runtime, distributed_runtime, gradient_sync, init_runtime
from .best import BestTracker, refuse_undefinable
from .logger import TrainLogger
from .loss import MultiTaskLoss, build_loss
from .memory_fit import check_batch_fits, out_of_memory_as_user_error
from .optim import build_optimizer, load_optimizer_state
from .sharding import sharded_tables

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    pass


class _StopWhileWaiting(Exception):
    """A stop signal that came while the step waited for new data: the step is dropped (it took nothing)."""


FOLLOW_PAST_SCHEDULE = (
    "training.follow: past num_train_steps (%d): every learning-rate schedule holds its last rate from here "
    "on (constant: the rate; linear ramp: its rate; cosine: final_learning_rate; piecewise: the last value)"
)


class Trainer:
    """One training run. `run()` trains from wherever save_dir's newest checkpoint left off."""

    def __init__(self, config: Config, *, amp: bool = False, runtime: Runtime | None = None):
        self.config = config
        self.runtime = runtime or init_runtime()
        check_sharding(config.data_sections, self.runtime.world_size)
        self.amp = amp
        torch.manual_seed(config.training.seed)
        specs = feature_specs(config.train_data)
        self.model: Ranker = build_model(config.model, specs, config.train_data.tasks).to(self.runtime.device)
        world = self.runtime.world_size
        batch_size, tasks = config.train_data.global_batch_size // world, len(config.train_data.tasks)
        check_batch_fits(specs, tasks, self.model, batch_size, world)
        # With sharded tables, checkpoints gather the shards into the bare model's layout (train/sharding.py).
        self.sharded = sharded_tables(config.training, self.model, self.runtime)
        if self.sharded is not None:
            self.train_model, params = self.sharded.module, self.sharded.optimizer_view
        else:  # DDP across ranks; checkpoints use the bare model
            self.train_model, params = self.runtime.wrap(self.model), self.model
        self.loss_fn: MultiTaskLoss = build_loss(config.model).to(self.runtime.device)
        self.optimizer, self.scheduler = build_optimizer(config.optimizer, params)
        self.accumulation = config.training.gradient_accumulation or 1
        self.step = 0
        self.run_folder = RunFolder(config.training.save_dir)
        self._stop_requested = False
        self._waiting_for_data = False
        self._stopped_early = False
        self.best: BestTracker | None = None  # with training.keep_best, on rank 0 (which decides)
        # A Kafka source's next offset per partition, all ranks' (data/sources/kafka.py): in every checkpoint.
        self.data_position: dict[int, int] = {}
        self._dataset: RecapDataset | None = None
        follow_sources(config)

    def restore(self) -> None:
        """Resume from save_dir's newest checkpoint, else warm start from initial_checkpoint_dir."""
        # Every rank resumes from the checkpoint rank 0 sees (save_dir is one folder that every node shares).
        newest = self.runtime.broadcast(self.run_folder.newest_checkpoint())
        if newest is not None:
            state = self._restore_weights(newest)
            optimizer_state = state["optimizer"]
            if self.sharded is not None:
                optimizer_state = self.sharded.local_optimizer_state(self.optimizer, optimizer_state)
            load_optimizer_state(self.optimizer, optimizer_state)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            self.data_position = restore_position(state, self.config.train_data)
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            log.info("resumed from %s at step %d", newest, self.step)
        elif self.config.training.initial_checkpoint_dir:
            source = self.runtime.broadcast(resolve_checkpoint(self.config.training.initial_checkpoint_dir))
            self._restore_weights(source)
            log.info("warm start from the weights of %s", source)
        if self.config.training.keep_best and self.runtime.is_main:
            training = self.config.training
            self.best = BestTracker(training.keep_best, self.run_folder, training.checkpoint_max_to_keep)

    def _restore_weights(self, checkpoint: Path) -> dict:
        if self.sharded is None:
            return restore_weights(self.model, checkpoint)
        state = load_checkpoint(checkpoint)
        self.sharded.load_model_state(state["model"], str(checkpoint))
        return state

    def save(self) -> Path | None:
        if self.sharded is not None:  # every rank takes part in gathering the shards
            model = self.sharded.full_model_state()
            optimizer = self.sharded.full_optimizer_state(self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        if not self.runtime.is_main:
            return None
        state = {
            "model": model,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": torch.get_rng_state(),
        }
        if self.config.train_data.kafka is not None:
            topic = self.config.train_data.kafka.topic
            state["data_position"] = {"topic": topic, "offsets": self.data_position}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        saved = save_checkpoint(self.run_folder.checkpoints, self.step, state)
        best = self.best.step if self.best else None
        self.run_folder.prune(self.config.training.checkpoint_max_to_keep, keep=best)
        return saved

    def run(self) -> None:
        # save_dir is one folder that every rank shares, and rank 0 alone writes there.
        with self.run_folder.claim() if self.runtime.is_main else nullcontext():
            self._run()

    def _run(self) -> None:
        training = self.config.training
        self.restore()
        if self.step >= training.num_train_steps and not training.follow:
            log.info("already at step %d of %d: nothing to do", self.step, training.num_train_steps)
            return
        if self.runtime.broadcast(self.best is not None and self.best.exhausted):
            log.info("stopped early at step %d: nothing to do (raise keep_best.patience to go on)", self.step)
            return
        with RecapDataset(
            self.config.train_data,
            seed=training.seed,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            shuffle=True,
            repeat=True,
            drop_last=True,
            where="train_data",
            follow=self.config.train_data.kafka is not None,  # a topic has no end: wait for messages
        ) as dataset:
            dataset.skip_to(self.step * self.accumulation)
            dataset.resume(self.data_position)
            self._dataset = dataset
            logger = TrainLogger(self.run_folder, enabled=self.runtime.is_main, resume_step=self.step)
            try:
                self._train(iter(dataset), logger, dataset.counts)
            finally:
                logger.close()

    def _train(
        self, batches: Iterator[Batch], logger: TrainLogger, data_counts: Callable[[], dict[str, int]]
    ) -> None:
        """Steps until num_train_steps or a stop signal, logging, checkpointing and evaluating on the way.
        data_counts: what reading has met so far, logged with every line (all ranks' together)."""
        training = self.config.training
        self.model.train()
        with (
            self._stop_on_signals(),
            tqdm(
                total=None if training.follow else training.num_train_steps,
                initial=self.step,
                disable=not self.runtime.is_main,
                dynamic_ncols=True,
                desc="train",
            ) as bar,
        ):
            # A signal may reach some ranks only, or at different times: all ranks stop at the same step.
            while (
                (training.follow or self.step < training.num_train_steps)
                and not self._stopped_early
                and not self.runtime.any(self._stop_requested)
            ):
                started = time.perf_counter()
                try:
                    where = f"at step {self.step + 1}"
                    with out_of_memory_as_user_error("train_data.global_batch_size", where):
                        total, per_task, examples = self.train_step(batches)
                except _StopWhileWaiting:
                    break
                self.step += 1
                if training.follow and self.step == training.num_train_steps + 1:
                    log.warning(FOLLOW_PAST_SCHEDULE, training.num_train_steps)
                self._gather_position(training)
                logger.add(total, per_task, examples, time.perf_counter() - started)
                bar.update(1)
                if self.step % training.train_log_every_n == 0:
                    counts = total_counts(self.runtime.gather(data_counts()))
                    line = logger.flush(self.step, self.model.task_names, self._learning_rates(), counts)
                    bar.set_postfix(loss=f"{line['loss']:.4f}")
                    log.info(_format_log_line(line))
                    self._log_stream(counts)
                if self.step % training.checkpoint_every_n == 0 or self.step == training.num_train_steps:
                    self.save()
                if self.step % training.eval_log_every_n == 0 and self._evaluates():
                    with out_of_memory_as_user_error(
                        "validation_data.<split>.global_batch_size", f"evaluating at step {self.step}"
                    ):
                        self._evaluate(logger)
        if self.step < training.num_train_steps or training.follow:
            if not self._stopped_early:
                log.info("stopping on a signal at step %d", self.step)
            self._gather_position(training, every_rank_here=True)
            self.save()

    def _gather_position(self, training: TrainingConfig, every_rank_here: bool = False) -> None:
        """Every rank's Kafka offsets into data_position, after each step (a checkpoint holds the offsets
        after the records of its steps). Under DDP a collective: only where a checkpoint may be saved."""
        if self._dataset is None or self.config.train_data.kafka is None:
            return
        due = self.step % training.checkpoint_every_n == 0 or self.step % training.eval_log_every_n == 0
        if self.runtime.world_size > 1 and not (due or every_rank_here):
            return
        for offsets in self.runtime.gather(self._dataset.position()):
            self.data_position.update(offsets)

    def _log_stream(self, counts: dict[str, int]) -> None:
        """Where a Kafka source stands: records behind (lag) and the broker time of the newest message."""
        if self.config.train_data.kafka is None:
            return
        kafka = self._dataset.kafka if self._dataset is not None else None
        times = [t for t in self.runtime.gather(kafka and kafka.newest_timestamp) if t is not None]
        newest = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(max(times))) if times else "none yet"
        log.info("kafka: %d records behind, newest message %s", counts.get("kafka_lag_records", 0), newest)

    def train_step(self, batches: Iterator[Batch]) -> tuple[torch.Tensor, torch.Tensor, int]:
        device = self.runtime.device
        total_sum = torch.zeros((), device=device)
        per_task_sum = torch.zeros(len(self.model.task_names), device=device)
        examples = 0
        for i in range(self.accumulation):
            batch = self._next_batch(batches).to(device, non_blocking=True)
            columns = batch.columns(self.model.task_names)
            with gradient_sync(self.train_model, enabled=i == self.accumulation - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.train_model(batch.features)["logits"]
                labels, weights = batch.labels[:, columns], batch.weights[:, columns]
                total, per_task = self.loss_fn(logits.float(), labels, weights)
                (total / self.accumulation).backward()
            total_sum += total.detach() / self.accumulation
            per_task_sum += per_task.detach() / self.accumulation
            examples += len(batch)
        # The global batch's loss (ranks hold equal shares), so that every rank agrees on a non-finite one.
        total_sum, per_task_sum = self.runtime.mean(total_sum), self.runtime.mean(per_task_sum)
        bad = ~torch.isfinite(per_task_sum)
        if bad.any():
            tasks = [t for t, b in zip(self.model.task_names, bad.tolist(), strict=True) if b]
            where = _nonfinite_inputs(batch)
            raise NonFiniteLoss(
                f"step {self.step + 1}: the loss of {', '.join(tasks)} is not finite{where}; "
                f"training stopped, the newest checkpoint in {self.run_folder.checkpoints} is the last good "
                "state"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_sum, per_task_sum, examples * self.runtime.world_size

    def _next_batch(self, batches: Iterator[Batch]) -> Batch:
        self._waiting_for_data = self.config.train_data.kafka is not None  # may wait for messages forever
        try:
            return next(batches)
        finally:
            self._waiting_for_data = False

    def _learning_rates(self) -> dict[str, float]:
        return {group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)}

    def _evaluates(self) -> bool:
        """Sharded tables' lookups are collectives, which an evaluation's uneven shares cannot run."""
        return self.sharded is None and bool(self.config.validation_data)

    def _evaluate(self, logger: TrainLogger) -> None:
        self.runtime.sync_buffers(self.model)  # evaluate the weights a checkpoint of this step holds
        self.model.eval()
        try:
            results = evaluate_splits(self.config, self.model, self.step, self.runtime)
        finally:
            self.model.train()
        logger.eval_scalars(self.step, results)
        keep_best = self.config.training.keep_best
        if keep_best:
            refuse_undefinable(keep_best, results)
            stop = self.best is not None and self.best.update(self.step, results, self.save)
            self._stopped_early = self.runtime.broadcast(stop)

    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save a checkpoint and return."""

        def request_stop(signum: int, frame: object) -> None:
            self._stop_requested = True
            if self._waiting_for_data:
                raise _StopWhileWaiting

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _nonfinite_inputs(batch: Batch) -> str:
    """Where a non-finite loss most often comes from: NaN or inf in the features (only double_norm_log
    maps them to 0)."""
    counts = {
        name: int((~torch.isfinite(values)).sum())
        for name, values in batch.features.items()
        if values.is_floating_point()
    }
    found = ", ".join(f"{n} in {name}" for name, n in counts.items() if n)
    return f" (the batch holds non-finite feature values: {found})" if found else ""


def _format_log_line(line: dict[str, float]) -> str:
    losses = {k.removeprefix("loss/"): v for k, v in line.items() if k.startswith("loss/")}
    short = short_names(list(losses))
    per_task = ", ".join(f"{short[task]}={value:.4f}" for task, value in losses.items())
    text = (
        f"step {line['step']}: loss {line['loss']:.4f} | {line['steps_per_s']:.2f} steps/s, "
        f"{line['examples_per_s']:.0f} examples/s | {per_task}"
    )
    counts = {k.removeprefix("data/"): v for k, v in line.items() if k.startswith("data/")}
    return f"{text} | data: {describe_counts(counts)}" if any(counts.values()) else text


def train(config: Config, *, amp: bool = False) -> None:
    # DDP warned on every rank that the towers' [1, n] output weights got gradients whose stride in the
    # size-1 dimension differs from its bucket view's (the same memory layout). Process-wide, set by the
    # training command rather than as a side effect of Runtime.wrap; not warnings.catch_warnings() around
    # each backward: entering and leaving it resets the registry of warnings already shown, so any other
    # warning raised in the loop would be printed again at every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    with distributed_runtime() as runtime:
        Trainer(config, amp=amp, runtime=runtime).run()
