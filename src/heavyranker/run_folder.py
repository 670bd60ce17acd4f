"""A run folder (training.save_dir): the one place that knows its layout, its lock, its best marker and which
checkpoints it keeps.

    train.lock                      held by the one `train` writing here (an flock: see RunFolder.claim)
    metrics.jsonl                   a line per train_log_every_n steps
    tensorboard/                    the same, and the evaluations, for TensorBoard
    checkpoints/step_<N>.pt         complete by construction (atomic writes), so the newest is safe to resume
    checkpoints/step_<N>.shards/    with sharded tables: every rank's shards of step N, written before
                                    step_<N>.pt (train/sharded_checkpoint.py), removed with it
    checkpoints/best.json           with training.keep_best: the best checkpoint's step and the state early
                                    stopping resumes from (BestMarker)
    eval/<split>/step_<N>.json      evaluation results

heavyranker never writes through a symbolic link at one of these files, nor over one: a link there (planted to
make `train` truncate the file it points at) is a one-line error."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO

from .atomic import atomic_write, refuse_link, temporaries, without_following
from .errors import UserError

log = logging.getLogger(__name__)

# A checkpoint, an evaluation's result, named as RunFolder names them. ASCII digits, no leading zero, and
# fullmatch: \d and int() take "\u0663" (an Arabic-Indic 3), and $ a final newline, so "step_\u0663.pt",
# "step_3.pt\n" or "step_03.pt" would pass for a second step 3.
_STEP_FILE = re.compile(r"step_(0|[1-9][0-9]*)(\.pt|\.json|\.shards)")


class NotAMarker(UserError):
    """best.json holds something heavyranker did not write: readers stop, `train` replaces it."""

    def __init__(self, path: Path, why: str):
        self.path, self.why = path, why
        super().__init__(
            f"{path}: not a best-checkpoint marker ({why}); remove it, or let train with training.keep_best "
            "write a new one"
        )


@dataclass(frozen=True)
class BestMarker:
    """checkpoints/best.json: the best checkpoint's step, what chose it, and early stopping's count."""

    step: int
    split: str
    task: str
    metric: str
    value: float
    evaluations_without_improvement: int
    evaluated_step: int  # the evaluations up to this step are counted

    def problem(self) -> str | None:
        """What makes this not a marker heavyranker writes, or None."""
        for field in fields(self):
            value = getattr(self, field.name)
            wanted = {"int": int, "str": str, "float": (int, float)}[field.type]
            if isinstance(value, bool) or not isinstance(value, wanted):
                return f"{field.name} is {json.dumps(value)}, not of type {field.type}"
            if field.type == "int" and value < 0:
                return f"{field.name} is {value}, below 0"
            if field.type == "float" and not math.isfinite(value):  # NaN would never be improved on
                return f"{field.name} is {value}, not a finite number"
        return None


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in a folder of checkpoints, oldest first (temporary files are not listed)."""
    return _by_step(Path(folder), ".pt")


def list_results(folder: str | Path) -> list[tuple[int, Path]]:
    """An evaluation's results in eval/<split>, oldest first (temporary files are not listed)."""
    return _by_step(Path(folder), ".json")


def _by_step(folder: Path, suffix: str) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [_STEP_FILE.fullmatch(name) for name in os.listdir(folder)]
    return sorted((int(m.group(1)), folder / m.group(0)) for m in found if m and m.group(2) == suffix)


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.best_marker = self.checkpoints / "best.json"
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.evaluations = self.path / "eval"
        self.lock = self.path / "train.lock"

    @classmethod
    def of_checkpoints(cls, folder: str | Path) -> RunFolder:
        """The run whose checkpoints are `folder` itself (a folder of step_<N>.pt files, named anything)."""
        run = cls(Path(folder).parent)
        run.checkpoints, run.best_marker = Path(folder), Path(folder) / run.best_marker.name
        return run

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}.pt"

    def shards(self, step: int) -> Path:
        """The folder of the shard files of checkpoint `step` (a run with sharded tables)."""
        return self.checkpoints / f"step_{step}.shards"

    def results(self, split: str) -> Path:
        return self.evaluations / split

    def result(self, split: str, step: int) -> Path:
        return self.results(split) / f"step_{step}.json"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        return list_checkpoints(self.checkpoints)

    def newest_checkpoint(self) -> Path | None:
        found = self.list_checkpoints()
        return found[-1][1] if found else None

    def read_best(self) -> BestMarker | None:
        """The best marker, or None where there is none. UserError, naming the file, where it is not one."""
        try:
            content = json.loads(refuse_link(self.best_marker).read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:  # not JSON, or not text
            raise NotAMarker(self.best_marker, str(e)) from None
        except OSError as e:  # a folder there, no permission
            raise UserError(f"{self.best_marker}: cannot read the best marker: {e.strerror}") from None
        if not isinstance(content, dict):
            raise NotAMarker(self.best_marker, f"{json.dumps(content)[:40]} is not a JSON object")
        missing = [f.name for f in fields(BestMarker) if f.name not in content]
        if missing:
            raise NotAMarker(self.best_marker, f"no {', '.join(missing)}")
        marker = BestMarker(**{f.name: content[f.name] for f in fields(BestMarker)})
        problem = marker.problem()
        if problem:
            raise NotAMarker(self.best_marker, problem)
        return marker

    def write_best(self, marker: BestMarker) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        with atomic_write(refuse_link(self.best_marker), "w") as f:  # a resumed run trusts what it reads back
            f.write(json.dumps(asdict(marker), indent=1))

    def best_checkpoint(self) -> Path | None:
        """The checkpoint the best marker names, or None where there is no marker."""
        marker = self.read_best()
        if marker is None:
            return None
        path = self.checkpoint(marker.step)
        if not path.is_file():
            raise UserError(
                f"{self.best_marker} marks {path.name} as the best checkpoint, but there is no such file"
            )
        return path

    def prune(self, max_to_keep: int | None, keep: int | None = None) -> None:
        """Remove all but the newest `max_to_keep` checkpoints (None keeps all) and the one of step `keep`
        (the best, which keep_best marks)."""
        if max_to_keep is not None:
            for step, old in self.list_checkpoints()[:-max_to_keep]:
                if step != keep:
                    old.unlink(missing_ok=True)
                    shutil.rmtree(self.shards(step), ignore_errors=True)
        self._remove_orphan_shards()

    def _remove_orphan_shards(self) -> None:
        """Shard folders without their step_<N>.pt: left by a save killed before it wrote that file (the
        shards come first), or by a removal killed halfway. Only between saves: a save's shards are written
        before its checkpoint."""
        for step, shards in _by_step(self.checkpoints, ".shards"):
            if not self.checkpoint(step).exists():
                shutil.rmtree(shards, ignore_errors=True)
                log.info("removed %s, whose checkpoint was never written or was removed", shards)

    @contextmanager
    def claim(self) -> Iterator[None]:
        """Hold the lock on the run folder for the block, and first remove the temporaries that killed runs
        left there. Raises UserError naming the holder (its pid, host and start) if another process holds it.

        A run folder belongs to one `train` at a time: two would overwrite each other's checkpoints and
        interleave metrics.jsonl. The lock is an flock on train.lock, which the kernel releases when its
        holder exits in any way, SIGKILL included, so a killed run never blocks the next one. `evaluate`
        (--watch beside a running train) only reads the run and takes no lock."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = without_following(self.lock, os.O_RDWR | os.O_CREAT, mode=0o600)
        except OSError as e:  # a file at save_dir, a folder at train.lock, no permission
            raise UserError(
                f"{e.filename}: cannot take the run folder (training.save_dir): {e.strerror}"
            ) from None
        with os.fdopen(fd, "r+") as lock:  # closing it releases the lock
            self._lock(lock)
            self._remove_stale_temporaries()
            yield

    def _lock(self, lock: IO[str]) -> None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "starting: its pid is not written yet"
            raise UserError(
                f"{self.lock}: another train holds this run folder ({holder}); "
                "wait for it to finish, stop it, or set another training.save_dir"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}")
        lock.flush()

    def _remove_stale_temporaries(self) -> None:
        """Temporaries of atomic writes (heavyranker/atomic.py) whose writer was killed stay forever: remove
        those among the files a train writes. Checkpoints and metrics.jsonl have no other writer while the
        lock is held; evaluation results also come from `evaluate`, which takes no lock and may be writing
        one now."""
        self._remove_orphan_shards()
        stale = temporaries(self.checkpoints)
        stale += [t for _, shards in _by_step(self.checkpoints, ".shards") for t in temporaries(shards)]
        stale += [t for t in temporaries(self.path) if t.target == self.metrics.name]
        for results in sorted(self.evaluations.iterdir()) if self.evaluations.is_dir() else []:
            stale += [t for t in temporaries(results) if not _running(t.pid)]
        for temporary in stale:
            temporary.path.unlink(missing_ok=True)
            log.info("removed %s, left by a writer that was killed", temporary.path)


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (an `evaluate` on another machine sharing save_dir is not
    seen). Not this one: a starting run has written nothing yet, and in a container a killed run and its
    successor often had the same pid."""
    return pid != os.getpid() and Path("/proc", str(pid)).exists()
