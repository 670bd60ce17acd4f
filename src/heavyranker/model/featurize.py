"""Featurization of the continuous features, then the raw features of `feature_names_to_concat` appended.

z_score_log reads per-feature statistics from a JSON file (written by `heavyranker data stats`):
    {"features": [{"mean": float, "std": float}, ...]}
one entry per column of the `continuous` tensor as the model sees it (after truncate_and_slice), in column
order; mean and std are those of sign(x) * log1p(|x|) over the finite values. Other keys are ignored.
A std of 0 (a constant column) is read as 1, so the column becomes 0 instead of NaN. Its optional batch norm
(or renorm) has torch's defaults (affine, momentum 0.1): the config has no settings for it.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..config.model import FeaturizationConfig, LayerNormConfig
from ..errors import DataError, UserError

WHERE = "model.featurization_config"


def log1p_abs(x: torch.Tensor) -> torch.Tensor:
    """A log that keeps the sign: defined for every finite float, 0 at 0."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


class NonFiniteToZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(x), x, 0.0)


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


class BatchRenorm1d(nn.BatchNorm1d):
    """Batch renormalization (Ioffe 2017, arXiv:1702.03275), without clipping of r and d: in training the
    output equals normalisation by the running statistics while gradients flow through the batch ones, so
    a model trained on small batches serves with the statistics it was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
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
        parts += [features[name].reshape(x.shape[0], -1).to(torch.float32) for name in self.concat_names]
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
    out = width + sum(_width(input_shapes[name]) for name in config.feature_names_to_concat)

    steps: list[nn.Module]
    layer_norm = None
    if config.log1p_abs_config is not None:
        steps = [Log1pAbs()]
    elif config.clip_log1p_abs_config is not None:
        steps = [Log1pAbs(), Clamp(config.clip_log1p_abs_config.clip_magnitude)]
    elif config.z_score_log_config is not None:
        z = config.z_score_log_config
        steps = [Log1pAbs(), ZScore(*load_feature_stats(z.analysis_path, width)), Clamp(z.clip_magnitude)]
        if z.use_renorm:
            steps.append(BatchRenorm1d(width))
        elif z.use_batch_norm:
            steps.append(nn.BatchNorm1d(width))
    else:
        d = config.double_norm_log_config
        assert d is not None  # the config allows exactly one featurization
        steps = [NonFiniteToZero(), Log1pAbs()]
        if d.batch_norm_config is not None:
            bn = d.batch_norm_config
            steps.append(nn.BatchNorm1d(width, affine=bn.affine, momentum=bn.momentum))
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
    try:
        with open(path) as f:
            entries = json.load(f)["features"]
        mean = [float(e["mean"]) for e in entries]
        std = [float(e["std"]) for e in entries]
    except OSError as e:
        raise DataError(f"{where}: cannot read the feature statistics: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f'{where}: not a feature statistics file ({{"features": [{{"mean": .., "std": ..}}, ...]}}, '
            f"from `heavyranker data stats`): {e!r}"
        ) from None
    if len(entries) != width:
        raise DataError(
            f"{where}: statistics for {len(entries)} features, but the continuous tensor has {width}"
        )
    for i, (m, s) in enumerate(zip(mean, std, strict=True)):
        if not (math.isfinite(m) and math.isfinite(s)) or s < 0:
            raise DataError(f"{where}: features[{i}]: mean {m} and std {s} must be finite, std >= 0")
    std_t = torch.tensor(std, dtype=torch.float32)
    return torch.tensor(mean, dtype=torch.float32), torch.where(std_t > 0, std_t, 1.0)
