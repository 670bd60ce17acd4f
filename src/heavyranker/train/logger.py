"""Training logs: a line per train_log_every_n steps to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..atomic import refuse_link, without_following
from ..config import Config, short_names
from ..data.dataset import describe_counts
from ..data.sources.follow import files_source_name
from ..errors import UserError
from ..run_folder import RunFolder
from ..runtime import Runtime

log = logging.getLogger(__name__)

# The evaluation's "loss" is the cross-entropy of the calibrated probabilities, weighted to the population
# (sum(w * l) / sum(w), no pos_weight); the training loss is the objective (BCE of the logits on the
# training data, sum(w * l) / B with pos_weight, averaged over tasks for train/loss). TensorBoard shows the
# evaluation's under what it is; the evaluation's JSON files keep the key "loss".
EVAL_SCALAR_NAMES = {"loss": "cross_entropy"}


class TrainLogger:
    """Averages the losses of the steps since the last flush; writes nothing unless `enabled` (rank 0).
    A run resumed at `resume_step` continues the logs of the run it resumes, less what that run logged past
    its checkpoint (the resumed run logs those steps again)."""

    def __init__(self, run: RunFolder, *, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._reset()
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where it writes

        try:
            run.path.mkdir(parents=True, exist_ok=True)
            _drop_lines_after(run.metrics, resume_step)
            self.jsonl = open(run.metrics, "a", opener=without_following)
            # TensorBoard hides the events of earlier files at steps >= purge_step.
            self.tensorboard = SummaryWriter(str(run.tensorboard), purge_step=resume_step + 1)
        except OSError as e:  # a folder at metrics.jsonl, a file at tensorboard/
            raise UserError(f"{e.filename}: cannot write the training log there: {e.strerror}") from None

    def _reset(self) -> None:
        self.steps = 0
        self.examples = 0
        self.seconds = 0.0
        self.total: torch.Tensor | float = 0.0
        self.per_task: torch.Tensor | float = 0.0

    def add(self, total: torch.Tensor, per_task: torch.Tensor, examples: int, seconds: float) -> None:
        self.steps += 1
        self.examples += examples
        self.seconds += seconds
        self.total = self.total + total
        self.per_task = self.per_task + per_task

    def flush(
        self,
        step: int,
        task_names: list[str],
        learning_rates: dict[str, float],
        data_counts: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Writes and returns the line of the steps since the last flush; data_counts (RecapDataset.counts()
        of the run so far) go under data/."""
        per_task = (self.per_task / self.steps).tolist()
        line: dict[str, Any] = {
            "step": step,
            "loss": float(self.total) / self.steps,
            **{f"loss/{t}": v for t, v in zip(task_names, per_task, strict=True)},
            **{f"lr/{name}": lr for name, lr in learning_rates.items()},
            "steps_per_s": self.steps / self.seconds,
            "examples_per_s": self.examples / self.seconds,
            **{f"data/{name}": n for name, n in (data_counts or {}).items()},
        }
        self._reset()
        if self.enabled:
            try:
                self.jsonl.write(json.dumps(line) + "\n")
                self.jsonl.flush()
            except OSError as e:  # the checkpoints, written atomically, are what a resumed run needs
                raise UserError(f"{self.jsonl.name}: cannot write the training log: {e.strerror}") from None
            for key, value in line.items():
                if key != "step":
                    self.tensorboard.add_scalar(f"train/{key}", value, step)
        return line

    def eval_scalars(self, step: int, results: dict[str, dict[str, dict[str, float]]]) -> None:
        if not self.enabled:
            return
        for split, tasks in results.items():
            for task, metrics in tasks.items():
                for name, value in metrics.items():
                    name = EVAL_SCALAR_NAMES.get(name, name)
                    self.tensorboard.add_scalar(f"eval/{split}/{task}/{name}", value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step`. train writes them in step order, so the lines past `step`
    are the last ones: they are read back from the end to the first line of a step <= `step`, and cut off.
    A resume reads what was logged past its checkpoint, not the whole run's log (a follow run's grows for
    weeks). A line train does not write among them is one error: the file is left as it was."""
    if not refuse_link(path).exists():
        return
    with open(path, "r+b", opener=without_following) as f:
        end = f.seek(0, os.SEEK_END)
        for offset, raw in _lines_backwards(f, end):
            try:
                line = raw.decode()
            except UnicodeDecodeError as e:
                where = f"{e.reason} at byte {offset + e.start}"
                raise UserError(f"{path}: not a training log (no UTF-8 text: {where})") from None
            logged = _step(line)
            if logged is None:
                number = _line_number(f, offset)
                raise UserError(
                    f"{path}: line {number} is not a line train writes (a JSON object with a step); move the "
                    "file away, or set another training.save_dir"
                )
            if logged <= step:
                f.truncate(offset + len(raw))
                return
        f.truncate(0)


def _lines_backwards(f: BinaryIO, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) of the lines of `f` up to `end`, the last first; each with its "\n" (the last may lack
    it). Lines end at "\n" alone: splitlines() also splits at "\x1c" and the like, which JSON strings hold."""
    position, pending = end, b""  # pending: the bytes from `position` to the last line handed out
    while True:
        cut = pending.rfind(b"\n", 0, len(pending) - 1)  # the end of the line before pending's last
        if cut >= 0:
            yield position + cut + 1, pending[cut + 1 :]
            pending = pending[: cut + 1]
        elif position == 0:
            if pending:
                yield 0, pending
            return
        else:
            size = min(TAIL_BLOCK, position)
            position -= size
            f.seek(position)
            pending = f.read(size) + pending


TAIL_BLOCK = 1 << 16


def _line_number(f: BinaryIO, offset: int) -> int:
    """The number (from 1) of the line of `f` that starts at `offset`."""
    f.seek(0)
    newlines, left = 0, offset
    while left:
        block = f.read(min(TAIL_BLOCK, left))
        newlines, left = newlines + block.count(b"\n"), left - len(block)
    return newlines + 1


def _step(line: str) -> float | None:
    """A line's step; math.inf for a line cut short by a kill or a full disk (dropped), None for a line train
    does not write."""
    if not line.endswith("\n"):  # cut short, maybe just before its newline
        return math.inf
    try:
        content = json.loads(line)
    except json.JSONDecodeError:  # the end of a line cut short by a kill
        return math.inf
    step = content.get("step") if isinstance(content, dict) else None
    return None if isinstance(step, bool) or not isinstance(step, int) else step


# Counts of ids outside a range table's rows (model.id_mapping), under data/ in metrics.jsonl.
OUT_OF_RANGE = "ids_out_of_range/"


def warn_out_of_range(counts: dict[str, int]) -> None:
    """One warning naming the tables whose ids fell outside their rows so far (counts: all ranks')."""
    outside = {k.removeprefix(OUT_OF_RANGE): n for k, n in counts.items() if k.startswith(OUT_OF_RANGE) and n}
    if outside:
        log.warning(
            "ids outside their table's rows, skipped (they learn nothing; id_mapping hash or managed takes "
            "raw ids), so far: %s",
            ", ".join(f"{table}={n}" for table, n in outside.items()),
        )


def format_log_line(line: dict[str, float]) -> str:
    """A TrainLogger.flush line as the training log prints it."""
    losses = {k.removeprefix("loss/"): v for k, v in line.items() if k.startswith("loss/")}
    short = short_names(list(losses))
    per_task = ", ".join(f"{short[task]}={value:.4f}" for task, value in losses.items())
    text = (
        f"step {line['step']}: loss {line['loss']:.4f} | {line['steps_per_s']:.2f} steps/s, "
        f"{line['examples_per_s']:.0f} examples/s | {per_task}"
    )
    counts = {k.removeprefix("data/"): v for k, v in line.items() if k.startswith("data/")}
    return f"{text} | data: {describe_counts(counts)}" if any(counts.values()) else text


def log_stream(stream: Any, config: Config, runtime: Runtime, counts: dict[str, int]) -> None:
    """Where a followed stream stands (collective: every rank): followed files, files behind and the newest
    folder (file) listed; Kafka, records behind (lag) and the broker time of the newest message."""
    if config.training.follow and files_source_name(config.train_data) is not None:
        newest = [n for n in runtime.gather(stream and stream.newest) if n is not None]
        behind, newest_text = counts.get("follow_lag_files", 0), max(newest, default="none yet")
        log.info("follow: %d files behind, newest %s", behind, newest_text)
    if config.train_data.kafka is None:
        return
    times = [t for t in runtime.gather(stream and stream.newest_timestamp) if t is not None]
    newest = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(max(times))) if times else "none yet"
    behind, tombstones = counts.get("kafka_lag_records", 0), counts.get("kafka_tombstones_skipped", 0)
    log.info("kafka: %d records behind, newest message %s, %d tombstones skipped", behind, newest, tombstones)
