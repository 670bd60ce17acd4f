"""DLRM (Naumov et al. 2019, arXiv:1906.00091): a bottom MLP on the dense input, pairwise dot products between
its output and the embedding vectors, a top MLP on [bottom output, dot products]."""

from __future__ import annotations

import torch
from torch import nn

from ..config.model import DLRMConfig
from ..errors import UserError
from .linear import DEFAULT_MATMUL, Matmul
from .mlp import Mlp, build_mlp

Slice = tuple[int, int]  # (first column, width) of a block of the input


class Dlrm(nn.Module):
    """The input is one [B, in_features] tensor; `vector_slices` say which columns hold the embedding vectors
    (each as wide as the bottom MLP's output), every other column is dense input."""

    def __init__(self, in_features: int, vector_slices: list[Slice], bottom_mlp: Mlp, top_mlp: Mlp):
        super().__init__()
        self.bottom_mlp = bottom_mlp
        self.top_mlp = top_mlp
        self.vector_slices = list(vector_slices)
        self.dense_slices = _complement(in_features, self.vector_slices)
        n = len(self.vector_slices) + 1  # the bottom MLP's output is a vector too
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("pair_index", rows * n + cols, persistent=False)
        self.out_features = top_mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = torch.cat([x[:, s : s + w] for s, w in self.dense_slices], dim=1)
        bottom = self.bottom_mlp(dense)
        vectors = torch.stack([bottom] + [x[:, s : s + w] for s, w in self.vector_slices], dim=1)  # [B, n, d]
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)[:, self.pair_index]  # [B, n(n-1)/2]
        return self.top_mlp(torch.cat([bottom, dots], dim=1))


def _complement(width: int, taken: list[Slice]) -> list[Slice]:
    free, start = [], 0
    for s, w in sorted(taken):
        if s > start:
            free.append((start, s - start))
        start = s + w
    if start < width:
        free.append((start, width - start))
    return free


def build_dlrm(
    in_features: int,
    config: DLRMConfig,
    vector_slices: list[Slice],
    where: str,
    *,
    matmul: Matmul = DEFAULT_MATMUL,
) -> Dlrm:
    """`where` is the config path of `config`, for errors."""
    dense_width = in_features - sum(w for _, w in vector_slices)
    bottom = build_mlp(dense_width, config.bottom_mlp, matmul=matmul)
    for s, w in vector_slices:
        if w != bottom.out_features:
            raise UserError(
                f"{where}.bottom_mlp: its output ({bottom.out_features}) must be as wide as each embedding "
                f"vector it is dotted with, but the input holds one of width {w} at column {s}"
            )
    n = len(vector_slices) + 1
    top = build_mlp(bottom.out_features + n * (n - 1) // 2, config.top_mlp, matmul=matmul)
    return Dlrm(in_features, vector_slices, bottom, top)
