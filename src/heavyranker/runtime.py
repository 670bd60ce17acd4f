"""Where this process runs: one process, or one rank of a torchrun job (PyTorch DDP: gloo on CPU, nccl on
CUDA). The collectives the loop and the evaluator need are methods of Runtime that do nothing in a single
process, so that code reads the same either way."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

T = TypeVar("T")

# A rank that stops answering without exiting (hung storage, a lost node) fails the job after this long
# instead of hanging it: the others' collectives time out and raise. (A rank that exits is noticed at once:
# torchrun stops the others.) It must exceed the longest a rank legitimately waits for a slower one: a
# checkpoint write on rank 0, an uneven share of a validation split, the data skipped on resume.
TIMEOUT_ENV = "HEAVYRANKER_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Part of a torchrun job (the process group exists), even a job of one process."""
        return dist.is_available() and dist.is_initialized()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: DDP, which averages the gradients over the ranks during backward, or the
        model itself. Keep using the bare model for checkpoints and evaluation: its state_dict keys do not
        depend on the world size, and its forward runs no collective (ranks may run different numbers)."""
        if not self.distributed:
            return model
        devices = [self.device] if self.device.type == "cuda" else None
        # DDP sends rank 0's buffers at each forward; a module's `same_on_every_rank` buffers (a managed
        # id map: 66 bytes a row, model/id_managed.py) are computed alike on every rank and need not travel.
        same = [
            f"{name}.{b}"
            for name, m in model.named_modules()
            if getattr(m, "same_on_every_rank", False)
            for b, _ in m.named_buffers(recurse=False)
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, same)
        return DistributedDataParallel(model, device_ids=devices)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (a new tensor)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)  # ReduceOp.AVG is nccl only
        return total / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: a decision every rank must take together."""
        if not self.distributed:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank. DDP sends rank 0's at the start of
        each forward, so after a step each rank holds its own batch's update; an evaluation must use the
        statistics the checkpoint holds, on every rank."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)


def processes_on_this_host() -> int:
    """This host's ranks (torchrun's LOCAL_WORLD_SIZE; 1 outside torchrun): they share its memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def init_runtime() -> Runtime:
    """CUDA when available (TF32 matmuls on), else CPU. Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK and the
    rendezvous address in the environment) it also joins the job's process group, once per process."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=_collective_timeout()),
            device_id=device if device.type == "cuda" else None,
        )
    return Runtime(rank, world_size, device)


@contextmanager
def distributed_runtime() -> Iterator[Runtime]:
    """init_runtime() for the length of a job, leaving the process group after a clean finish. Not after an
    error: tearing down a group whose other ranks may be inside a collective can block, and the exit of this
    process ends its part anyway (torchrun then stops the other ranks). A collective that fails because
    another rank's process is gone is a UserError in one line (gloo's traceback says nothing more)."""
    runtime = init_runtime()
    try:
        yield runtime
    except RuntimeError as error:
        gone = next((words for words in _PEER_GONE if words in str(error)), None)
        if runtime.world_size > 1 and gone:
            raise UserError(
                f"rank {runtime.rank} of {runtime.world_size}: another rank of this job is gone (a "
                f"collective met: {gone}); its own log, or torchrun's report, says why"
            ) from None
        raise
    if dist.is_initialized():
        dist.destroy_process_group()


# What gloo's collectives raise, in a plain RuntimeError, when another rank's process is gone (killed, or
# exited on an error of its own): its socket is closed or reset.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _collective_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds > 0")
    return seconds


def gradient_sync(model: nn.Module, enabled: bool) -> AbstractContextManager:
    """DDP averages the gradients in every backward; with gradient accumulation only the last micro-batch
    needs it (the others' gradients add up locally first), which saves all but one all-reduce per step."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return nullcontext()


def launch_torchrun(argv: list[str], nproc: int) -> NoReturn:
    """`heavyranker <argv>` as `nproc` ranks on this machine: replaces this process with torchrun, so that
    signals and the exit status are torchrun's own (it stops every rank when one fails)."""
    env = dict(os.environ)
    # torchrun gives each worker 1 thread when OMP_NUM_THREADS is unset: give each its share of the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*torchrun, "-m", "heavyranker", *_without_nproc(argv)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)


def _without_nproc(argv: list[str]) -> list[str]:
    """argv less `--nproc N` and `--nproc=N`: each worker runs the command as one process."""
    kept: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--nproc":
            next(args, None)  # its value
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept
