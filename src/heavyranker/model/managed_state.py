"""A managed table's state (model/id_managed.py) as it loads: a checkpoint of the first layout completed, and
the checks it passes: a damaged buffer in a checkpoint is a one-line error naming it, where it would be a
numpy traceback at the first count (a negative count or sighting), an allocation as large as its value (a
sighting of 2**40: 8 TiB for its histogram), or rows looked up out of place."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import DataError

# Added after the first layout: a checkpoint without them holds an empty recent part and no vacated row.
SPLIT_STATE = ("recent_ids", "recent_rows", "num_recent", "num_vacated")


def complete_first_layout(mapping: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """The buffers a checkpoint of the first layout (all its resident ids in the main part) lacks, put into
    `state_dict` (the mapping's under `prefix`) as that layout means them, where it holds the mapping's."""
    if prefix + "sorted_ids" in state_dict:
        for name in SPLIT_STATE:
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(mapping, name)))


def check_managed_state(buffers: dict[str, torch.Tensor], num_embeddings: int, prefix: str) -> None:
    """Raises a DataError naming the first buffer (under `prefix`) that no count of a table of
    num_embeddings rows could have left: O(table), once per load."""
    state = {name: tensor.detach().cpu().numpy() for name, tensor in buffers.items()}
    scalar = {name: int(state[name]) for name in ("tick", "num_resident", "num_recent", "num_vacated")}
    in_main = scalar["num_resident"] - scalar["num_recent"] + scalar["num_vacated"]
    recent = scalar["num_recent"]
    problems = [
        ("tick", scalar["tick"] >= 0, "is negative"),
        ("row_used", not state["row_used"][0], "holds row 0, the default row, which no id owns"),
        (
            "num_resident",
            scalar["num_resident"] == np.count_nonzero(state["row_used"]),
            f"is {scalar['num_resident']}, but row_used marks {np.count_nonzero(state['row_used'])} rows",
        ),
        ("num_recent", 0 <= recent <= len(state["recent_ids"]), f"{recent} is outside the recent part"),
        (
            "num_vacated",
            0 <= scalar["num_vacated"] and 0 <= in_main <= num_embeddings,
            f"leaves {in_main} ids in the sorted main part",
        ),
        ("sorted_ids", _ascending(state["sorted_ids"][: max(in_main, 0)]), "is not strictly ascending"),
        ("recent_ids", _ascending(state["recent_ids"][: max(recent, 0)]), "is not strictly ascending"),
        (
            "sorted_rows",
            _within(state["sorted_rows"][: max(in_main, 0)], 0, num_embeddings),
            "has a row out of range",
        ),
        (
            "recent_rows",
            _within(state["recent_rows"][: max(recent, 0)], 1, num_embeddings),
            "has a row out of range",
        ),
    ]
    for table in ("row", "candidate"):
        problems.append((f"{table}_count", _within(state[f"{table}_count"], 0, None), "has a negative count"))
        problems.append(
            (
                f"{table}_last",
                _within(state[f"{table}_last"], 0, scalar["tick"] + 1),
                "has a sighting after tick",
            )
        )
    for name, fine, problem in problems:
        if not fine:
            raise DataError(f"a damaged managed id table: {prefix}{name} {problem}")


def _ascending(values: np.ndarray) -> bool:
    return bool((values[1:] > values[:-1]).all())  # not np.diff: ids far apart overflow int64


def _within(values: np.ndarray, low: int, high: int | None) -> bool:
    """All of values in [low, high) (no upper bound: None)."""
    return bool((values >= low).all() and (high is None or (values < high).all()))
