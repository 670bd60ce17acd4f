import ctypes
import ctypes.util
import resource

import pytest
import torch

from heavyranker.memory import keep_freed_memory

PAGE = resource.getpagesize()


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt"), reason="mallopt is glibc's"
)
def test_a_step_that_allocates_what_the_last_one_freed_does_not_fault_its_pages_in_again():
    """Six 16 MiB blocks allocated and freed, as a step's gradients are: by default glibc trims the heap
    after each round and the next one faults every page in again."""
    keep_freed_memory()
    rounds = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(4 * 2**20) for _ in range(6)]  # every page written
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert sum(b[-1].item() for b in blocks) == 6
        del blocks
    pages = 6 * 16 * 2**20 // PAGE
    assert rounds[-1] < 0.05 * pages, f"page faults per round: {rounds} ({pages} pages)"
