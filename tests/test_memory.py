import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

# Six 16 MiB blocks allocated and freed, as a step's gradients are, in a fresh process (the pytest worker's
# heap depends on the tests run before), with or without keep_freed_memory (argv[1]). Per round, from glibc's
# mallinfo2: the bytes mapped outside the heap while the blocks live, and the heap's size at that peak and
# after they are freed. Not page faults, which measured the same thing but also counted pages the kernel
# took back for reasons of its own: one clean-clone run in ~10 saw a round fault two blocks in again.
ROUNDS = """
import ctypes, ctypes.util, sys, torch
from heavyranker.memory import keep_freed_memory
fields = ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()
MallInfo2 = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    keep_freed_memory()
for _ in range(6):
    blocks = [torch.ones(4 * 2**20) for _ in range(6)]  # every page written
    peak = libc.mallinfo2()
    assert sum(b[-1].item() for b in blocks) == 6
    del blocks
    print(peak.hblkhd, peak.arena, libc.mallinfo2().arena)
"""
LIBC = ctypes.CDLL(ctypes.util.find_library("c"))


def rounds(mode: str) -> list[tuple[int, ...]]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return [tuple(int(n) for n in line.split()) for line in out.stdout.splitlines()]


@pytest.mark.skipif(
    not hasattr(LIBC, "mallinfo2"), reason="mallopt and mallinfo2 are glibc's (2.33 and later)"
)
def test_a_step_that_allocates_what_the_last_one_freed_does_not_fault_its_pages_in_again():
    """With keep_freed_memory every block comes from the heap, and the heap keeps what a round freed for the
    next one (so its pages stay in). By default glibc maps the first round's blocks apart and unmaps them at
    their free, then trims the heap now and then: those pages are faulted in again (bench/model_step.py
    measures the step)."""
    block = 16 * 2**20
    kept = rounds("keep")
    assert all(mapped < block for mapped, _, _ in kept), f"(mapped, heap at peak, heap after): {kept}"
    assert all(after == peak for _, peak, after in kept), f"(mapped, heap at peak, heap after): {kept}"
    default = rounds("default")
    assert default[0][0] >= 6 * block, f"(mapped, heap at peak, heap after): {default}"


def test_only_the_commands_that_train_set_it(monkeypatch, small_config_path):
    from heavyranker import cli, demo, handlers
    from heavyranker.train import loop

    calls = []
    monkeypatch.setattr(handlers, "keep_freed_memory", lambda: calls.append("set"))
    monkeypatch.setattr(loop, "train", lambda config, on_checkpoint=None: calls.append("train"))
    monkeypatch.setattr(demo, "run_demo", lambda path, overrides: calls.append("demo"))
    config = str(small_config_path)
    assert cli.main(["config", "validate", config]) == 0
    assert cli.main(["model", "summary", "--config", config]) == 0
    assert calls == []
    assert cli.main(["train", "--config", config]) == 0
    assert cli.main(["demo", "--config", config]) == 0
    assert calls == ["set", "train", "set", "demo"]


def test_the_memory_limit_is_the_cgroups_when_it_has_one(tmp_path, monkeypatch):
    from heavyranker import memory

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (str(v2), str(v1)))
    assert memory.memory_limit() == (physical, "the physical memory")  # no cgroup files
    v2.write_text("max\n")
    v1.write_text(f"{2**63 - 4096}\n")  # v1's "unlimited"
    assert memory.memory_limit() == (physical, "the physical memory")
    v1.write_text(f"{2**30}\n")
    assert memory.memory_limit() == (2**30, f"the cgroup limit in {v1}")
