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

from ..checkpoint import SHARDED_TABLES, check_resumable, resolve_checkpoint, save_checkpoint
from ..config import Config
from ..config.training import TrainingConfig
from ..cpu import bf16_warning, cpu_info
from ..data.batch import Batch
from ..data.columns import feature_specs
from ..data.dataset import RecapDataset, total_counts
from ..data.sources.files import check_sharding
from ..data.sources.follow import follow_sources
from ..errors import UserError
from ..eval.evaluator import Results, evaluate_splits
from ..memory import out_of_memory_as_user_error
from ..model import Ranker, build_model, restore_weights
from ..model.linear import matmul_for
from ..run_folder import RunFolder
from ..runtime import Runtime, distributed_runtime, gradient_sync, init_runtime, processes_on_this_host
from .best import BestTracker, refuse_undefinable
from .logger import OUT_OF_RANGE, TrainLogger, format_log_line, log_stream, warn_out_of_range
from .loss import MultiTaskLoss, build_loss
from .memory_fit import check_batch_fits, check_model_fits
from .optim import build_optimizer, load_optimizer_state
from .sharded_checkpoint import write_shards
from .sharding import sharded_tables
from .stream_position import StreamPosition
from .table_optim import build_table_optimizer

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    pass


class _StopWhileWaiting(Exception):
    """A stop signal that came while the step waited for new data: the step is dropped (it took nothing)."""


READY_POLL_SECONDS = 1.0  # under DDP on a stream, how often the ranks tell each other whether they have data

FOLLOW_PAST_SCHEDULE = (
    "training.follow: past num_train_steps (%d): every learning-rate schedule holds its last rate from here "
    "on (constant: the rate; linear ramp: its rate; cosine: final_learning_rate; piecewise: the last value)"
)

LAYER_SIZES = "the id tables' num_embeddings or the layers' sizes (model)"
# Called on rank 0 with each checkpoint written and its step (a run that promotes: release/follow.py).
CheckpointHook = Callable[[Path, int], None]


class Trainer:
    """One training run. `run()` trains from wherever save_dir's newest checkpoint left off."""

    def __init__(
        self,
        config: Config,
        *,
        runtime: Runtime | None = None,
        on_evaluation: Callable[[int, Results], bool] | None = None,
        on_checkpoint: CheckpointHook | None = None,
    ):
        """on_evaluation(step, results), on rank 0 after each evaluation: True ends the run there, as early
        stopping does (`tune` prunes a trial so, without train knowing of the tuner). on_checkpoint(path,
        step), on rank 0 after each checkpoint (follow mode's promotion)."""
        self.config = config
        self.on_evaluation = on_evaluation
        self.on_checkpoint = on_checkpoint
        self.runtime = runtime or init_runtime()
        check_sharding(
            config.data_sections, self.runtime.world_size, "train_data" if config.training.follow else None
        )
        precision = config.training.precision
        self.amp = precision == "bf16"  # bf16 autocast of the forward; weights and optimizer stay fp32
        on_cpu = self.runtime.device.type == "cpu"
        if self.amp and on_cpu and self.runtime.is_main and (warning := bf16_warning(cpu_info())):
            log.warning(warning)  # once, not once per rank
        torch.manual_seed(config.training.seed)
        specs = feature_specs(config.train_data)
        world = self.runtime.world_size
        sharding = config.training.embedding_sharding == "torchrec"
        table_shards = world if sharding else 1
        device, here = self.runtime.device, processes_on_this_host()
        state = check_model_fits(config.model, specs, config.optimizer, table_shards, device, here)
        matmul = matmul_for(precision)
        with out_of_memory_as_user_error(LAYER_SIZES, "building the model"):
            # Sharded: the large tables' rows are allocated as each rank's shards only (sharded_tables below).
            model = build_model(
                config.model,
                specs,
                config.train_data.tasks,
                matmul=matmul,
                allocate_large_tables=not sharding,
            )
        self.model: Ranker = model.to(self.runtime.device)
        batch_size, tasks = config.train_data.global_batch_size // world, len(config.train_data.tasks)
        check_batch_fits(specs, tasks, self.model, batch_size, state, world)
        self.sharded = sharded_tables(config.training, self.model, self.runtime)
        if self.sharded is not None:
            self.train_model, params = self.sharded.module, self.sharded.optimizer_view
        else:  # DDP across ranks; checkpoints use the bare model
            self.train_model, params = self.runtime.wrap(self.model), self.model
        self.loss_fn: MultiTaskLoss = build_loss(config.model).to(self.runtime.device)
        self.optimizer, self.scheduler = build_optimizer(config.optimizer, params)
        splits = self.sharded.column_splits() if self.sharded is not None else None
        self.table_optimizer = build_table_optimizer(config.optimizer, params.table_parameters(), splits)
        self.accumulation = config.training.gradient_accumulation or 1
        self.step = 0
        self.run_folder = RunFolder(config.training.save_dir)
        self._stop_requested = False
        self._waiting_for_data = False
        self._stopped_early = False
        self.best: BestTracker | None = None  # with training.keep_best, on rank 0 (which decides)
        # Where a stream stands, all ranks' (data/sources/follow.py): in every checkpoint. A stream: a Kafka
        # topic, or followed files; it may wait for data.
        self.stream_position = StreamPosition(config, self.runtime)
        self._streaming = config.train_data.kafka is not None or config.training.follow
        self._dataset: RecapDataset | None = None
        follow_sources(config)

    def restore(self) -> None:
        """Resume from save_dir's newest checkpoint, else warm start from initial_checkpoint_dir."""
        # Every rank resumes from the checkpoint rank 0 sees (save_dir is one folder that every node shares).
        newest = self.runtime.broadcast(self.run_folder.newest_checkpoint())
        if newest is not None:
            hint = "training.save_dir holds a run of another model: give this one its own save_dir"
            state = self._restore_weights(newest, hint)
            check_resumable(state, newest)
            load_optimizer_state(self.optimizer, self._local_state(self.optimizer, state, "optimizer"))
            self.scheduler.load_state_dict(state["scheduler"])
            if self.table_optimizer is not None and "table_optimizer" in state:
                table_state = self._local_state(self.table_optimizer, state, "table_optimizer")
                self.table_optimizer.load_state_dict(table_state)
            self.step = int(state["step"])
            self.stream_position.restore(state)
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda_rng"])
            log.info("resumed from %s at step %d", newest, self.step)
        elif self.config.training.initial_checkpoint_dir:
            source = self.runtime.broadcast(resolve_checkpoint(self.config.training.initial_checkpoint_dir))
            hint = "training.initial_checkpoint_dir is a run of another model"
            self._restore_weights(source, hint, mapped=True)
            log.info("warm start from the weights of %s", source)
        if self.config.training.keep_best and self.runtime.is_main:
            training = self.config.training
            self.best = BestTracker(training.keep_best, self.run_folder, training.checkpoint_max_to_keep)

    def _local_state(self, optimizer: torch.optim.Optimizer, state: dict, kind: str) -> dict:
        """A checkpoint's state[kind] as `optimizer` takes it here: with sharded tables, this rank's parts of
        the tables' per-row state (read from a sharded checkpoint's shard files, or cut from a full one)."""
        if self.sharded is None:
            return state[kind]
        shards = state.get(SHARDED_TABLES)
        return self.sharded.local_optimizer_state(optimizer, state[kind], shards, kind=kind)

    def _restore_weights(self, checkpoint: Path, misfit_hint: str, mapped: bool = False) -> dict:
        """`mapped`: for a warm start, which takes the weights only (model.restore_weights)."""
        load = None if self.sharded is None else self.sharded.load_model_state
        return restore_weights(self.model, checkpoint, misfit_hint=misfit_hint, load=load, mapped=mapped)

    def save(self) -> Path | None:
        shards = None
        if self.sharded is not None:  # every rank writes its own shards first (train/sharded_checkpoint.py)
            checkpoints = self.run_folder.checkpoints
            shards = write_shards(self.sharded, self.optimizer, checkpoints, self.step, self.table_optimizer)
            model, optimizer = shards.model, shards.optimizer
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
        self.stream_position.save(state, self._dataset)
        if self.table_optimizer is not None:  # sharded: the large tables' state is in their shards
            state["table_optimizer"] = shards.table_optimizer if shards else self.table_optimizer.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state()
        if shards is not None:  # where they are; step_<N>.pt, written last, makes the checkpoint exist
            state[SHARDED_TABLES] = shards.index
        saved = save_checkpoint(self.run_folder.checkpoints, self.step, state)
        if shards is not None:
            shards.remove_replaced()
        best = self.best.step if self.best else None
        self.run_folder.prune(self.config.training.checkpoint_max_to_keep, keep=best)
        if self.on_checkpoint is not None:  # promotion (release/follow.py): the steps wait for it
            self.on_checkpoint(saved, self.step)
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
            follow=self._streaming,  # a topic has no end: wait for messages
        ) as dataset:
            dataset.skip_to(self.step * self.accumulation)
            self.stream_position.resume(dataset)
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
                if not self._every_rank_has_data():
                    break
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
                    outside = {f"{OUT_OF_RANGE}{k}": n for k, n in self.model.ids_out_of_range().items()}
                    counts = total_counts(self.runtime.gather({**data_counts(), **outside}))
                    line = logger.flush(self.step, self.model.task_names, self._learning_rates(), counts)
                    bar.set_postfix(loss=f"{line['loss']:.4f}")
                    log.info(format_log_line(line))
                    warn_out_of_range(counts)
                    log_stream(self._dataset.stream, self.config, self.runtime, counts)
                if self.step % training.checkpoint_every_n == 0 or self.step == training.num_train_steps:
                    self.save()
                if self.step % training.eval_log_every_n == 0 and self.config.validation_data:
                    with out_of_memory_as_user_error(
                        "validation_data.<split>.global_batch_size", f"evaluating at step {self.step}"
                    ):
                        self._evaluate(logger)
        if self.step < training.num_train_steps or training.follow:
            if not self._stopped_early:
                log.info("stopping on a signal at step %d", self.step)
            self._gather_position(training, every_rank_here=True)
            if self._streaming:  # where the stream stood at the stop, whenever the last log line was
                counts = total_counts(self.runtime.gather(data_counts()))
                log_stream(self._dataset.stream, self.config, self.runtime, counts)
            self.save()

    def _gather_position(self, training: TrainingConfig, every_rank_here: bool = False) -> None:
        """Every rank's stream position (StreamPosition.gather), after each step; under DDP only where a
        checkpoint may be saved."""
        if self._dataset is not None and self._streaming:
            saving = (
                self.step % training.checkpoint_every_n == 0 or self.step % training.eval_log_every_n == 0
            )
            self.stream_position.gather(self._dataset, saving or every_rank_here)

    def _every_rank_has_data(self) -> bool:
        """Under DDP, on a stream: waits until every rank's next batch is there, so that no rank waits for
        data inside the step's collectives (a stop signal there would leave the other ranks waiting in them).
        False: a stop was asked for meanwhile, on some rank."""
        if not self._streaming or self.runtime.world_size == 1:
            return True
        while True:
            states = self.runtime.gather((self._dataset.ready(READY_POLL_SECONDS), self._stop_requested))
            if any(stop for _, stop in states):
                return False
            if all(ready for ready, _ in states):
                return True

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
        if self.table_optimizer is not None:
            self.table_optimizer.step()
            self.table_optimizer.zero_grad(set_to_none=True)
        return total_sum, per_task_sum, examples * self.runtime.world_size

    def _next_batch(self, batches: Iterator[Batch]) -> Batch:
        self._waiting_for_data = self._streaming  # may wait for new data forever
        try:
            return next(batches)
        finally:
            self._waiting_for_data = False

    def _learning_rates(self) -> dict[str, float]:
        rates = {
            group.get("name", str(i)): group["lr"] for i, group in enumerate(self.optimizer.param_groups)
        }
        if self.table_optimizer is not None:
            rates["embedding_tables"] = self.table_optimizer.param_groups[0]["lr"]
        return rates

    def _evaluate(self, logger: TrainLogger) -> None:
        self.runtime.sync_buffers(self.model)  # evaluate the weights a checkpoint of this step holds
        self.model.eval()
        try:
            if self.sharded:  # each rank on its shards, every rank in step (train/sharded_eval.py)
                scoring = self.sharded.in_step(feature_specs(self.config.train_data))
                results = evaluate_splits(self.config, self.model, self.step, self.runtime, scoring=scoring)
            else:
                results = evaluate_splits(self.config, self.model, self.step, self.runtime)
        finally:
            self.model.train()
        logger.eval_scalars(self.step, results)
        keep_best = self.config.training.keep_best
        stop = False
        if keep_best:
            refuse_undefinable(keep_best, results)
            if self.sharded and self.runtime.broadcast(
                self.best is not None and self.best.saves(self.step, results)
            ):
                self.save()  # saving shards takes every rank: before rank 0's update, which finds it saved
            stop = self.best is not None and self.best.update(self.step, results, self.save)
        if self.on_evaluation is not None and self.runtime.is_main:
            stop = self.on_evaluation(self.step, results) or stop
        if keep_best or self.on_evaluation is not None:
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
        failed = True
        try:
            yield
            failed = False
        finally:
            # A rank's error ends its process: torchrun's SIGTERM (another rank is gone) must not kill it
            # before the error reaches its one line (the default handler did: no line, exit -15).
            for s, handler in previous.items() if not (failed and self.runtime.distributed) else ():
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


def train(config: Config, *, on_checkpoint: CheckpointHook | None = None) -> None:
    """The run of `config`; `on_checkpoint(path, step)` is called on rank 0 after each checkpoint."""
    # DDP warned on every rank that the towers' [1, n] output weights got gradients whose stride in the
    # size-1 dimension differs from its bucket view's (the same memory layout). Process-wide, set by the
    # training command rather than as a side effect of Runtime.wrap; not warnings.catch_warnings() around
    # each backward: entering and leaving it resets the registry of warnings already shown, so any other
    # warning raised in the loop would be printed again at every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    with distributed_runtime() as runtime:
        Trainer(config, runtime=runtime, on_checkpoint=on_checkpoint).run()
