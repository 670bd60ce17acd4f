"""What torch keeps for the process's life of each program a promotion exports, let go when it is done.

A follow run promotes in its training process every N steps for weeks (follow.py); each promotion exports
the candidate with torch.export and loads it and the served version. Measured on local_small (30
promotions in one process), each one grew the process by about 0.9 MiB that no later promotion reused:
Python objects, about 3,900 a promotion (malloc_trim after each one did not change the slope: not heap
fragmentation). What held them:

- torch.export leaves each export's ShapeEnv alive: C++ keeps some of its SymNodes (the symbolic sizes of
  traced tensors: 15 to 126 an export here; make_fx alone does it, for any op on a dynamic dimension)
  whatever Python lets go. The ShapeEnv holds the symbolic entries of FakeTensor's
  dispatch cache (ShapeEnv.fake_tensor_cache: ~3,500 objects an export of local_small's model), so they
  are not made: FakeTensor's cache is off while promoting (local_small's export took 1.0 to 1.8 s with it,
  1.0 to 1.6 s without, 5 of each on a loaded machine). The ShapeEnv itself, its symbols and guards stay:
  ~300 objects, 0.09 MiB a promotion.
- torch.fx keeps the generated Python source of every graph module it builds (torch.fx.graph_module's
  loader and linecache, for tracebacks' lines), never emptied: ~10 modules an export, 0.35 MiB for
  local_small. Those made while promoting are dropped after it.
- The lru_caches on ShapeEnv's methods hold ShapeEnvs (scorer.clear_shape_env_caches), emptied after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..serve.scorer import clear_shape_env_caches, forget_fx_sources, fx_sources


@contextlib.contextmanager
def torch_leftovers_released() -> Iterator[None]:
    """Inside: exports and loads whose leftovers (the module's docstring) go at the end. Nothing made inside
    may need its graph modules' sources afterwards, but for a traceback's lines."""
    before = set(fx_sources())
    try:
        with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            yield
    finally:
        forget_fx_sources(set(fx_sources()) - before)
        clear_shape_env_caches()
