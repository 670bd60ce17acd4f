"""Process-wide allocator setting for the commands and benchmarks that train (it pays off in the step)."""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def keep_freed_memory() -> None:
    """Keep blocks up to 32 MiB in glibc's heap once freed, instead of handing them back to the OS.

    With glibc's defaults the heap is trimmed whenever its free top passes a threshold, so each training
    step's gradients fault their pages in again, in kernel time that is a sizeable part of a step:
    bench/model_step.py measures the step with this and with glibc's defaults (--glibc-default), and
    bench/results/model_step.json holds its figures. A training process reaches the same peak every step,
    so keeping it costs no more memory than the peak itself. Blocks over 32 MiB
    stay mapped and unmapped one by one, as by default: forcing them into the heap too (M_MMAP_MAX=0)
    fragments it, several times a large tensor's size. A no-op off glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # a C int: 2 GiB
