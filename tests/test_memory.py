import ctypes
import ctypes.util
import os
import resource
import subprocess
import sys

import pytest

PAGE = resource.getpagesize()


# Six 16 MiB blocks allocated and freed, as a step's gradients are, in a fresh process: the pytest worker's
# heap (and its other threads' page faults, which RUSAGE_SELF counts too) depend on the tests run before.
ROUNDS = """
import resource, torch
from heavyranker.memory import keep_freed_memory
keep_freed_memory()
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 * 2**20) for _ in range(6)]  # every page written
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert sum(b[-1].item() for b in blocks) == 6
    del blocks
"""


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt"), reason="mallopt is glibc's"
)
def test_a_step_that_allocates_what_the_last_one_freed_does_not_fault_its_pages_in_again():
    """By default glibc trims the heap after a round, and the next one faults its pages in again (in most
    runs: its thresholds adapt, so a default run may also settle; bench/model_step.py measures the step)."""
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True)
    rounds = [int(line) for line in out.stdout.split()]
    pages = 6 * 16 * 2**20 // PAGE
    assert rounds[-1] < 0.05 * pages, f"page faults per round: {rounds} ({pages} pages)"


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
