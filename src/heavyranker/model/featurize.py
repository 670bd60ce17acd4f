"""Featurization of the continuous features, then the raw features of `feature_names_to_concat` appended.

z_score_log reads per-feature statistics from a JSON file (written by `heavyranker data stats`):
    {"features": [{"mean": float, "std": float}, ...]}
one entry per column of the `continuous` tensor as the model sees it (after truncate_and_slice), in column
order; mean and std are those of sign(x) * log1p(|x|) over the finite values. Other keys are ignored; a file
over 64 Ki characters per feature (plus 64 Ki) is refused unread.
A std of 0 (a constant column) is read as 1, so the column becomes 0 instead of NaN. Its optional batch norm
(or renorm) has torch's defaults (affine, momentum 0.1): the config has no settings for it.

piecewise_linear reads bin edges from the same file: each entry's "quantiles", the ascending quantiles of
sign(x) * log1p(|x|) at 0, 1/N, ..., 1 (written by `heavyranker data stats --bins N`). Equal edges (a
value most rows share, such as 0) are merged, so a feature has at most N bins; a constant feature has none
and adds nothing to the input.

periodic reads no file: its frequencies and layers are parameters, learnt with the rest of the model at the
backbone's rate (they are outside every tower).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from torch import nn

from ..config.model import FeaturizationConfig, LayerNormConfig
from ..errors import DataError, UserError
from .embeddings import per_example
from .linear import MAX_LAYER_WEIGHTS
from .mlp import BatchNorm1d

WHERE = "model.featurization_config"
# The most bins a feature may have, as `heavyranker data stats --bins` writes at most: the buffers are
# [features, most bins] and the input width their sum, so a file's bins must not be unbounded.
MAX_BINS = 1024
# The most characters of a stats file read per feature: one of data stats' at MAX_BINS takes about 30,000.
# A larger file (the training data named by mistake) is refused after that much, not read whole.
CHARS_PER_FEATURE = 2**16


def log1p_abs(x: torch.Tensor) -> torch.Tensor:
    """A log that keeps the sign: defined for every finite float, 0 at 0."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


class NonFiniteToZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # where(isfinite(x), x, 0) in one pass: torch's isfinite makes several (1,000 x 2,117 inputs: 0.7 ms
        # against 7.7, one thread), which was 4% of a bf16 program's forward.
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class Log1pAbs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log1p_abs(x)


class Clamp(nn.Module):
    def __init__(self, magnitude: float):
        super().__init__()
        self.magnitude = magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.magnitude, self.magnitude)


class ZScore(nn.Module):
    """(x - mean) / std with fixed per-feature statistics, kept in checkpoints with the weights."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BatchRenorm1d(BatchNorm1d):
    """Batch renormalization (Ioffe 2017, arXiv:1702.03275), without clipping of r and d: in training the
    output equals normalisation by the running statistics while gradients flow through the batch ones, so
    a model trained on small batches serves with the statistics it was trained with. A batch of one row
    is normalised by the running statistics alone (BatchNorm1d's): its unbiased variance is NaN, which
    the running variance took, and every later output with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] < 2:
            return super().forward(x)
        mean, var = x.mean(dim=0), x.var(dim=0, unbiased=False)
        std = (var + self.eps).sqrt()
        running_std = (self.running_var + self.eps).sqrt()
        r = (std / running_std).detach()
        d = ((mean - self.running_mean) / running_std).detach()
        y = (x - mean) / std * r + d
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(x.var(dim=0, unbiased=True), self.momentum)
            self.num_batches_tracked += 1
        return y * self.weight + self.bias if self.affine else y


class PiecewiseLinear(nn.Module):
    """[B, F] -> [B, total bins]: feature j's component t is clamp((x_j - edges_j[t]) / (edges_j[t + 1] -
    edges_j[t]), 0, 1), so a value in bin k encodes to k-1 ones, its fraction of bin k, then zeros, and values
    beyond the outer edges saturate. Features are padded to the most bins and the padding dropped (`keep`)."""

    def __init__(self, edges: list[np.ndarray]):
        super().__init__()
        bins = max([len(e) - 1 for e in edges] + [1])
        lower, width = torch.zeros(len(edges), bins), torch.ones(len(edges), bins)
        keep = []
        for j, e in enumerate(edges):
            lower[j, : len(e) - 1] = torch.from_numpy(e[:-1])
            width[j, : len(e) - 1] = torch.from_numpy(np.diff(e))
            keep += [j * bins + t for t in range(len(e) - 1)]
        self.register_buffer("lower", lower)
        self.register_buffer("width", width)
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.int64))
        self.out_features = len(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoded = ((x.unsqueeze(-1) - self.lower) / self.width).clamp(0.0, 1.0)
        return encoded.flatten(1).index_select(1, self.keep)


class Periodic(nn.Module):
    """[B, F] -> [B, F * embedding_dim]: PLR (Gorishniy et al. 2022). Feature j's value v becomes
    relu([cos(2 pi c_j v), sin(2 pi c_j v)] W_j + b_j) with its own frequencies c_j [k] (initialised from
    N(0, sigma)) and its own layer W_j [2k, embedding_dim], b_j (initialised as nn.Linear's)."""

    def __init__(self, features: int, n_frequencies: int, sigma: float, embedding_dim: int):
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(features, n_frequencies) * sigma)
        bound = 1.0 / math.sqrt(2 * n_frequencies)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(
            torch.empty(features, 2 * n_frequencies, embedding_dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(features, embedding_dim).uniform_(-bound, bound))
        self.out_features = features * embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * self.frequencies * x.unsqueeze(-1)  # [B, F, k]
        periodic = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # [B, F, 2k]
        # Each feature through its own layer: [F, B, 2k] @ [F, 2k, d] -> [F, B, d].
        embedded = torch.bmm(periodic.transpose(0, 1), self.weight).transpose(0, 1) + self.bias
        return torch.relu(embedded).flatten(1)


class Featurizer(nn.Module):
    """transform(continuous), then the raw `concat_names` features as float32, then an optional LayerNorm."""

    def __init__(
        self,
        transform: nn.Sequential,
        concat_names: list[str],
        layer_norm: nn.LayerNorm | None,
        out_features: int,
    ):
        super().__init__()
        self.transform = transform
        self.concat_names = list(concat_names)
        self.layer_norm = layer_norm
        self.out_features = out_features

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = features["continuous"]
        parts = [self.transform(x)]
        parts += [per_example(features[name]).to(torch.float32) for name in self.concat_names]
        x = torch.cat(parts, dim=1)
        return self.layer_norm(x) if self.layer_norm is not None else x


def build_featurizer(config: FeaturizationConfig, input_shapes: dict[str, tuple[int, ...]]) -> Featurizer:
    if "continuous" not in input_shapes:
        raise UserError(f"{WHERE}: the data has no `continuous` feature (it has {', '.join(input_shapes)})")
    width = _width(input_shapes["continuous"])
    for name in config.feature_names_to_concat:
        if name not in input_shapes:
            raise UserError(
                f"{WHERE}.feature_names_to_concat: {name} is not a feature of train_data "
                f"(it has {', '.join(input_shapes)})"
            )
    concat = sum(_width(input_shapes[name]) for name in config.feature_names_to_concat)
    out = width + concat

    steps: list[nn.Module]
    layer_norm = None
    if config.piecewise_linear_config is not None:
        encoding = PiecewiseLinear(load_bin_edges(config.piecewise_linear_config.analysis_path, width))
        steps = [NonFiniteToZero(), Log1pAbs(), encoding]
        out = encoding.out_features + concat
    elif (p := config.periodic_config) is not None:
        weights = width * 2 * p.n_frequencies * p.embedding_dim
        if weights > MAX_LAYER_WEIGHTS:  # its per-feature layers: the bound of one dense layer
            raise UserError(
                f"{WHERE}.periodic_config: {width:,} features x 2 x {p.n_frequencies} frequencies x "
                f"{p.embedding_dim} dimensions would be {weights:,} weights, over 2**30 (4 GiB of float32)"
            )
        encoding = Periodic(width, p.n_frequencies, p.sigma, p.embedding_dim)
        steps = [NonFiniteToZero(), Log1pAbs(), encoding]
        out = encoding.out_features + concat
    elif config.log1p_abs_config is not None:
        steps = [Log1pAbs()]
    elif config.clip_log1p_abs_config is not None:
        steps = [Log1pAbs(), Clamp(config.clip_log1p_abs_config.clip_magnitude)]
    elif config.z_score_log_config is not None:
        z = config.z_score_log_config
        steps = [Log1pAbs(), ZScore(*load_feature_stats(z.analysis_path, width)), Clamp(z.clip_magnitude)]
        if z.use_renorm:
            steps.append(BatchRenorm1d(width))
        elif z.use_batch_norm:
            steps.append(BatchNorm1d(width))
    else:
        d = config.double_norm_log_config
        assert d is not None  # the config allows exactly one featurization
        steps = [NonFiniteToZero(), Log1pAbs()]
        if d.batch_norm_config is not None:
            bn = d.batch_norm_config
            steps.append(BatchNorm1d(width, affine=bn.affine, momentum=bn.momentum))
        steps.append(Clamp(d.clip_magnitude))
        if d.layer_norm_config is not None:
            layer_norm = _layer_norm(out, d.layer_norm_config)
    return Featurizer(nn.Sequential(*steps), config.feature_names_to_concat, layer_norm, out)


def _width(shape: tuple[int, ...]) -> int:
    return shape[-1] if shape else 1


def _layer_norm(width: int, config: LayerNormConfig) -> nn.LayerNorm:
    if config.center and not config.scale:
        raise UserError(
            f"{WHERE}.double_norm_log_config.layer_norm_config: center without scale is not supported "
            "(set scale: true, or center: false)"
        )
    return nn.LayerNorm(width, eps=config.epsilon, elementwise_affine=config.scale, bias=config.center)


def load_feature_stats(path: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) float32 [width] from a stats file in the format of this module's docstring."""
    where = f"{path} ({WHERE}.z_score_log_config.analysis_path)"
    entries = _stats_entries(path, where, width)
    try:
        mean = [_json_number(e["mean"]) for e in entries]
        std = [_json_number(e["std"]) for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f'{where}: not a feature statistics file ({{"features": [{{"mean": .., "std": ..}}, ...]}}, '
            f"from `heavyranker data stats`): {e!r}"
        ) from None
    _check_count(len(entries), width, where)
    # Checked as the float32 the model keeps: a value beyond float32's range (1e39) would be an infinity,
    # every z-score of its column NaN or 0.
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    for i, (m, s) in enumerate(zip(mean_t.tolist(), std_t.tolist(), strict=True)):
        if not (math.isfinite(m) and math.isfinite(s)) or s < 0:
            raise DataError(
                f"{where}: features[{i}]: mean {mean[i]} and std {std[i]} must be finite as float32 "
                "(|v| < 3.4e38), std >= 0"
            )
    return mean_t, torch.where(std_t > 0, std_t, 1.0)


def load_bin_edges(path: str, width: int) -> list[np.ndarray]:
    """Each feature's distinct bin edges, ascending float32, from the "quantiles" of a stats file."""
    where = f"{path} ({WHERE}.piecewise_linear_config.analysis_path)"
    entries = _stats_entries(path, where, width)
    _check_count(len(entries), width, where)
    edges = []
    for i, entry in enumerate(entries):
        try:
            quantiles = np.asarray([_json_number(q) for q in entry["quantiles"]], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{where}: features[{i}] has no list of numbers `quantiles` ({e!r}); write the file with "
                "`heavyranker data stats --bins N`"
            ) from None
        if quantiles.ndim != 1 or not np.isfinite(quantiles).all() or (np.diff(quantiles) < 0).any():
            raise DataError(f"{where}: features[{i}].quantiles must be finite numbers in ascending order")
        if len(quantiles) == 0:  # data stats writes [0.0] for a column without a finite value
            raise DataError(f"{where}: features[{i}].quantiles is empty: at least one edge (one: no bins)")
        if len(quantiles) > MAX_BINS + 1:
            raise DataError(
                f"{where}: features[{i}] has {len(quantiles)} quantiles, at most {MAX_BINS + 1} "
                f"({MAX_BINS} bins, as `heavyranker data stats --bins` writes)"
            )
        with np.errstate(over="ignore"):
            distinct = np.unique(quantiles.astype(np.float32))  # float32 first: edges equal in float32 merge
            widths = np.diff(distinct)
        if not (np.isfinite(distinct).all() and np.isfinite(widths).all()):  # else bins of width inf: zeros
            raise DataError(
                f"{where}: features[{i}].quantiles must be finite numbers in ascending order, and they and "
                "their differences finite as float32 (|v| < 3.4e38)"
            )
        edges.append(distinct)
    return edges


def _json_number(value: object) -> float:
    """A JSON number: float() and numpy also take "1.5" and true, which `data stats` never writes (a file
    edited by hand, or another tool's, that means something else)."""
    if type(value) not in (int, float):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def _stats_entries(path: str, where: str, width: int) -> list:
    """The "features" list of a stats file for `width` continuous columns, one entry per column."""
    limit = (width + 1) * CHARS_PER_FEATURE
    try:
        with open(path) as f:
            text = f.read(limit + 1)
        if len(text) > limit:
            raise DataError(
                f"{where}: over {limit:,} characters for {width} features: not a statistics file of "
                "`heavyranker data stats`"
            )
        entries = json.loads(text)["features"]
        if not isinstance(entries, list):
            raise TypeError(f"features is a {type(entries).__name__}, not a list")
    except OSError as e:
        raise DataError(f"{where}: cannot read the feature statistics: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        raise DataError(
            f'{where}: not a feature statistics file ({{"features": [...]}}, from `heavyranker data stats`): '
            f"{e!r}"
        ) from None
    return entries


def _check_count(count: int, width: int, where: str) -> None:
    if count != width:
        raise DataError(f"{where}: statistics for {count} features, but the continuous tensor has {width}")
