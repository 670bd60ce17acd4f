"""`heavyranker data dump`: the arrays of a few batches, as the model would see them, in an .npz file."""

from __future__ import annotations

import logging
from itertools import islice

import numpy as np
import torch

from ..atomic import atomic_write, output_file
from ..config.data import DataConfig
from ..errors import SettingError, UserError
from .dataset import RecapDataset, describe_counts

log = logging.getLogger(__name__)


def dump_batches(
    data: DataConfig,
    *,
    seed: int,
    split: str = "train",
    where: str = "train_data",
    inputs: str | None = None,
    batches: int = 1,
    shuffle: bool = True,
    out: str = "batches.npz",
) -> None:
    """Writes the first `batches` batches of `data`, the data config of `split` ("train" or a validation
    split; `where` is its dotted path, for messages), to `out`: every feature under its renamed name,
    `labels` and `weights` [N, T], and `tasks` (the label order).
    The train split with shuffle=True is read exactly as training reads it (shuffled from `seed`,
    repeated, full batches), so the batches are training's first ones. Otherwise one pass is read (fewer
    batches if it ends first): a validation split in the order evaluation reads it, or shuffled.
    `inputs` (a glob) replaces the split's files. bfloat16 features are written as float32 (numpy has no
    bfloat16)."""
    if batches < 1:
        raise SettingError("batches", f"must be at least 1, got {batches}")
    output_file(out, "data dump: --out")
    as_training = shuffle and split == "train"
    with RecapDataset(
        data,
        seed=seed,
        shuffle=shuffle,
        repeat=as_training,
        drop_last=as_training,
        inputs=inputs,
        where=where,
    ) as dataset:
        read = list(islice(dataset, batches))
        log.info("%s: %s", where, describe_counts(dataset.counts()))
    if not read:
        raise UserError(f"split {split}: no examples to dump")
    arrays = {name: _numpy([b.features[name] for b in read]) for name in read[0].features}
    arrays["labels"] = _numpy([b.labels for b in read])
    arrays["weights"] = _numpy([b.weights for b in read])
    arrays["tasks"] = np.array(read[0].tasks)
    # A file object: np.savez would append .npz to a name without it. Atomic: a failed write keeps the
    # previous dump.
    with atomic_write(out) as f:
        np.savez(f, **arrays)
    log.info("wrote %d examples of %s (%d batches) to %s", len(arrays["labels"]), split, len(read), out)


def _numpy(tensors: list[torch.Tensor]) -> np.ndarray:
    joined = torch.cat(tensors)
    return (joined.float() if joined.dtype == torch.bfloat16 else joined).numpy()
