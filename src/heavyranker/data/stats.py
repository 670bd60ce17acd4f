"""`heavyranker data stats`: per-feature statistics of the continuous features for z_score_log featurization
(model.featurization_config.z_score_log_config.analysis_path).

The file, JSON: {"transform": ..., "examples": N, "features": [{"mean", "std", "count"}, ...]}, one entry per
column of the `continuous` tensor as the model sees it (after truncate_and_slice), in column order: the mean
and the population standard deviation of sign(x) * log1p(|x|) over the finite values of the column (count of
them), over the first `batches` batches of the training data read in order. A column without a finite value
gets mean 0 and std 0 (the featurizer reads a std of 0 as 1).

With `bins` N, each entry also holds "quantiles": the N + 1 quantiles of the same finite values at 0, 1/N,
..., 1 (numpy's linear interpolation) for piecewise_linear featurization, over the first rows read, at most
QUANTILE_VALUES values in all (so a wide schema keeps fewer rows); [0.0] for a column without a finite value.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from ..atomic import atomic_write, output_file
from ..config.data import DataConfig
from ..errors import DataError, SettingError, UserError
from .dataset import RecapDataset, describe_counts

log = logging.getLogger(__name__)

QUANTILE_VALUES = 2**24  # 64 MiB of float32 rows held for the quantiles


def write_feature_stats(
    data: DataConfig, *, seed: int, out: str, batches: int, bins: int | None = None
) -> None:
    """The statistics of the first `batches` batches of `data` (the training data, read in order from
    `seed`), written to `out`; with `bins`, each column's quantiles for that many bins too."""
    if batches < 1:
        raise SettingError("batches", f"must be positive, got {batches}")
    if bins is not None and not 1 <= bins <= 1024:
        raise SettingError("bins", f"must be 1 to 1024, got {bins}")
    output_file(out, "data stats: --out")
    count, mean, m2, rows = _moments(data, seed, batches)
    std = np.sqrt(np.divide(m2, count, out=np.zeros_like(m2), where=count > 0))
    stats = {
        "transform": "sign(x) * log1p(|x|)",
        "examples": int(count.max(initial=0)),
        "features": [
            {"mean": float(m), "std": float(s), "count": int(c)}
            for m, s, c in zip(mean, std, count, strict=True)
        ],
    }
    if bins is not None:
        for entry, edges in zip(stats["features"], _quantiles(rows, bins), strict=True):
            entry["quantiles"] = edges
    with atomic_write(out, "w") as f:
        json.dump(stats, f, indent=1)
    log.info(
        "wrote statistics of %d continuous features over %d examples to %s", len(mean), stats["examples"], out
    )


def _quantiles(rows: np.ndarray, bins: int) -> list[list[float]]:
    """Per column of rows (NaN where not finite): its quantiles at 0, 1/bins, ..., 1, or [0.0] if all NaN."""
    levels = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for column in rows.T:
        finite = column[~np.isnan(column)]
        out.append(np.quantile(finite.astype(np.float64), levels).tolist() if finite.size else [0.0])
    return out


def _moments(
    data: DataConfig, seed: int, batches: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per column: the count, mean and sum of squared deviations of the finite transformed values,
    merged batch by batch (Chan et al.'s pairwise update: no cancellation on large sums); and the first
    rows' transformed values (NaN where not finite), at most QUANTILE_VALUES values."""
    if "continuous" not in data.seg_dense_schema.renamed_features:
        raise UserError(
            "train_data.seg_dense_schema.renamed_features has no `continuous` feature to describe"
        )
    count = mean = m2 = None
    rows: list[np.ndarray] = []
    kept = 0
    with RecapDataset(data, seed=seed, where="train_data") as dataset:
        for i, batch in enumerate(dataset):
            if i == batches:
                break
            x = batch.features["continuous"].double().numpy()
            t = np.sign(x) * np.log1p(np.abs(x))
            finite = np.isfinite(t)
            room = (QUANTILE_VALUES - kept) // max(t.shape[1], 1)
            if room > 0:
                rows.append(np.where(finite, t, np.nan)[:room].astype(np.float32))
                kept += rows[-1].size
            n = finite.sum(axis=0).astype(np.float64)
            t = np.where(finite, t, 0.0)
            batch_mean = np.divide(t.sum(axis=0), n, out=np.zeros_like(n), where=n > 0)
            batch_m2 = (np.where(finite, t - batch_mean, 0.0) ** 2).sum(axis=0)
            if count is None:
                count, mean, m2 = n, batch_mean, batch_m2
                continue
            total = count + n
            delta = batch_mean - mean
            share = np.divide(n, total, out=np.zeros_like(n), where=total > 0)
            mean = mean + delta * share
            m2 = m2 + batch_m2 + delta**2 * count * share
            count = total
        log.info("train_data: %s", describe_counts(dataset.counts()))
    if count is None:
        raise DataError(f"no training examples to describe in {data.inputs or 'the dated inputs'}")
    return count, mean, m2, np.concatenate(rows)
