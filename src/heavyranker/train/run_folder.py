"""A run folder (training.save_dir) belongs to one `train` at a time: two would overwrite each other's
checkpoints and interleave metrics.jsonl. The lock is an flock on `save_dir/train.lock`, which the kernel
releases when its holder exits in any way, SIGKILL included, so a killed run never blocks the next one.
`evaluate` (--watch beside a running train) only reads the run and takes no lock."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..atomic import temporaries
from ..checkpoint import checkpoint_dir
from ..config import Config
from ..errors import UserError
from ..eval.evaluator import results_folder
from .logger import METRICS

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"


@contextmanager
def claim_run_folder(config: Config) -> Iterator[None]:
    """Hold the lock on save_dir for the block, and first remove the temporaries that killed runs left there.
    Raises UserError naming the holder (its pid, host and start) if another process holds it."""
    folder = Path(config.training.save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with open(path, "a+") as lock:  # closing it releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "starting: its pid is not written yet"
            raise UserError(
                f"{path}: another train holds this run folder ({holder}); "
                "wait for it to finish, stop it, or set another training.save_dir"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %z")
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}")
        lock.flush()
        _remove_stale_temporaries(config)
        yield


def _remove_stale_temporaries(config: Config) -> None:
    """Temporaries of atomic writes (heavyranker/atomic.py) whose writer was killed stay forever: remove
    those among the files a train writes. Checkpoints and metrics.jsonl have no other writer while the lock
    is held; evaluation results also come from `evaluate`, which takes no lock and may be writing one now."""
    save_dir = config.training.save_dir
    stale = temporaries(checkpoint_dir(save_dir))
    stale += [t for t in temporaries(save_dir) if t.target == METRICS]
    for split in config.validation_data:
        stale += [t for t in temporaries(results_folder(config, split)) if not _running(t.pid)]
    for temporary in stale:
        temporary.path.unlink(missing_ok=True)
        log.info("removed %s, left by a writer that was killed", temporary.path)


def _running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (an `evaluate` on another machine sharing save_dir is not
    seen). Not this one: a starting run has written nothing yet, and in a container a killed run and its
    successor often had the same pid."""
    return pid != os.getpid() and Path("/proc", str(pid)).exists()
