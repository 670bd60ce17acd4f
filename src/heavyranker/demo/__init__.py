"""`heavyranker demo` (`make demo`): the demo run (run.py) and the baselines it judges the ranker against
(baselines.py), which serve only the demo."""

from .run import run_demo

__all__ = ["run_demo"]
