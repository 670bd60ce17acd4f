"""Process-wide memory: the allocator setting for the commands and benchmarks that train (it pays off in the
step), the most memory a process may use, and an out-of-memory as one line that names the setting to lower
(training, evaluate and compare)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
from collections.abc import Iterator

from .errors import UserError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
# How torch's CPU allocator words a failed allocation, by version.
ALLOCATOR_FAILED = ("not enough memory", "can't allocate memory")


def keep_freed_memory() -> None:
    """Keep blocks up to 32 MiB in glibc's heap once freed, instead of handing them back to the OS.

    With glibc's defaults the heap is trimmed whenever its free top passes a threshold, so each training
    step's gradients fault their pages in again, in kernel time that is a sizeable part of a step:
    bench/model_step.py measures the step with this and with glibc's defaults (--glibc-default), and
    bench/results/model_step.json holds its figures. A training process reaches the same peak every step,
    so keeping it costs no more memory than the peak itself. Blocks over 32 MiB
    stay mapped and unmapped one by one, as by default: forcing them into the heap too (M_MMAP_MAX=0)
    fragments it, several times a large tensor's size. A no-op off glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # a C int: 2 GiB


def return_freed_memory() -> None:
    """Hands the free pages of glibc's heaps back to the OS (malloc_trim), for a process that is done with
    a model: freed, a model's smaller tensors (under glibc's mmap threshold, which rises to 32 MiB as large
    blocks are freed) stay in the heap, in pieces that glibc's own trimming (of the heap's top alone) does
    not reach. A no-op off glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


CGROUP_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2: "max" when unlimited
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",  # cgroup v1: a huge number when unlimited
)


def memory_limit() -> tuple[int, str]:
    """The most memory this process may use, in bytes, and where that limit comes from: its cgroup's
    limit (a container's), else the machine's physical memory."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < physical:
            return int(text), f"the cgroup limit in {path}"
    return physical, "the physical memory"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: numpy's MemoryError, torch's CPU allocator's
    RuntimeError, or CUDA's OutOfMemoryError."""
    import torch  # here: the CLI imports this module at start, long before a command needs torch

    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in ALLOCATOR_FAILED)


def out_of_memory_words(error: BaseException) -> str:
    """ "out of memory" and the size that could not be allocated, where the allocator's message says it."""
    size = re.search(r"allocate (\d+) bytes", str(error))
    return "out of memory" + (f" (an allocation of {int(size[1]) / 2**20:,.1f} MiB failed)" if size else "")


@contextlib.contextmanager
def out_of_memory_as_user_error(setting: str, doing: str) -> Iterator[None]:
    """An out-of-memory inside becomes one line: what was being done and which setting to lower."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory {doing}; lower {setting}") from None
