import logging

import pytest

from heavyranker.cli import log_level


@pytest.mark.parametrize(
    "rank, verbose, level",
    [
        (None, False, logging.INFO),
        (None, True, logging.DEBUG),
        ("0", True, logging.DEBUG),
        ("1", False, logging.WARNING),
        ("3", True, logging.WARNING),  # every rank would print the same debug lines
    ],
)
def test_only_rank_0_logs_progress(monkeypatch, rank, verbose, level):
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert log_level(verbose) == level
