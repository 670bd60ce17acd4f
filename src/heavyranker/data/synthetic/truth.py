"""The planted truth of synthetic data: a sidecar next to each data file (part-00000.gz ->
part-00000.truth.npz) with, per record in file order, the true probability of every label (the best any
model of the features can predict), the labels drawn from it, and the meta ids to align predictions."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...atomic import atomic_write
from ...errors import DataError

SUFFIX = ".truth.npz"
IDS = ("user_id", "tweet_id", "author_id")


def truth_path(data_file: str) -> str:
    stem = data_file[: -len(".gz")] if data_file.endswith(".gz") else data_file
    return stem + SUFFIX


@dataclass(frozen=True)
class TruthTable:
    tasks: tuple[str, ...]
    true_probabilities: np.ndarray  # [n, tasks] float32
    true_labels: np.ndarray  # [n, tasks] int8
    ids: dict[str, np.ndarray]  # user_id / tweet_id / author_id -> [n] int64

    def __len__(self) -> int:
        return len(self.true_labels)

    def probabilities(self, tasks: Sequence[str]) -> np.ndarray:
        """[n, len(tasks)] true probabilities, columns in the order of `tasks`."""
        return self.true_probabilities[:, self._columns(tasks)]

    def labels(self, tasks: Sequence[str]) -> np.ndarray:
        """[n, len(tasks)] the labels written in the data, as float32 like a Batch's."""
        return self.true_labels[:, self._columns(tasks)].astype(np.float32)

    def _columns(self, tasks: Sequence[str]) -> list[int]:
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise DataError(f"the truth has no task {', '.join(missing)} (it has {', '.join(self.tasks)})")
        return [self.tasks.index(t) for t in tasks]


def write_truth(
    path: str, tasks: Sequence[str], probabilities: np.ndarray, labels: np.ndarray, ids: dict[str, np.ndarray]
) -> None:
    """Writes a sidecar atomically (a temporary name renamed into place)."""
    # Not compressed: zlib on random floats costs more time than it saves space. A file object: np.savez
    # would add ".npz" to the temporary's name.
    with atomic_write(path) as f:
        np.savez(
            f,
            tasks=np.array(tasks),
            probabilities=probabilities.astype(np.float32),
            labels=labels.astype(np.int8),
            **{name: ids[name] for name in IDS},
        )


def load_truth(data_files: Sequence[str]) -> TruthTable:
    """The truth of these data files, concatenated in the order given (records in file order)."""
    parts = [_read(f) for f in data_files]
    if not parts:
        raise DataError("load_truth: no data files given")
    tasks = parts[0].tasks
    for f, part in zip(data_files, parts, strict=True):
        if part.tasks != tasks:
            raise DataError(
                f"{truth_path(f)}: tasks {', '.join(part.tasks)} differ from those of "
                f"{truth_path(data_files[0])} ({', '.join(tasks)})"
            )
    return TruthTable(
        tasks,
        np.concatenate([p.true_probabilities for p in parts]),
        np.concatenate([p.true_labels for p in parts]),
        {name: np.concatenate([p.ids[name] for p in parts]) for name in IDS},
    )


def _read(data_file: str) -> TruthTable:
    path = truth_path(data_file)
    try:
        with np.load(path) as z:
            return TruthTable(
                tuple(str(t) for t in z["tasks"]),
                z["probabilities"],
                z["labels"],
                {name: z[name] for name in IDS},
            )
    except FileNotFoundError:
        raise DataError(
            f"{data_file}: no truth sidecar {path} (`heavyranker data generate` writes one "
            f"next to each data file)"
        ) from None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a truth sidecar: {e}") from None
