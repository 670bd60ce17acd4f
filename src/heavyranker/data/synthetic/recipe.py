"""How the columns of a wide feature are drawn, level by level."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, ndtri

LEVELS = ("user", "author", "tweet", "example")  # where a column's value comes from


@dataclass
class Recipe:
    """How the columns of one wide feature are drawn: each column's level (whose rows share its value),
    sparsity, scale and loading on its level's driving trait; and the kept columns, shuffled, where the
    truth's sources are planted."""

    role: str
    level: np.ndarray  # index into LEVELS, per column
    sparsity: np.ndarray  # continuous: chance of an exact zero; binary: chance of a 1
    mu: np.ndarray
    sigma: np.ndarray
    load: np.ndarray
    integer: np.ndarray  # counts, else real values
    categories: np.ndarray  # discrete
    planted: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, role: str, width: int, kept: np.ndarray) -> Recipe:
        level = rng.choice(len(LEVELS), size=width, p=[0.3, 0.2, 0.25, 0.25])
        if role in ("binary", "other_int"):
            sparsity = np.exp(rng.uniform(np.log(0.003), np.log(0.3), width))
        else:
            sparsity = rng.beta(0.6, 0.8, width)
        return cls(
            role,
            level,
            sparsity,
            rng.uniform(-1.0, 5.0, width),
            rng.uniform(0.5, 2.0, width),
            rng.normal(0.0, 0.5, width).clip(-0.9, 0.9),
            rng.random(width) < 0.7,
            np.exp(rng.uniform(np.log(2), np.log(1000), width)).astype(np.int64),
            rng.permutation(kept),
        )

    def values(self, rng: np.random.Generator, level: str, driver: np.ndarray) -> np.ndarray:
        """[len(driver), columns of `level`] for entities whose driving trait is `driver`."""
        columns = np.flatnonzero(self.level == LEVELS.index(level))
        load = self.load[columns]
        z = load * driver[:, None] + np.sqrt(1 - load**2) * rng.standard_normal((len(driver), len(columns)))
        if self.role in ("binary", "other_int"):  # sparse flags
            return (z > ndtri(1 - self.sparsity[columns])).astype(np.float64)
        if self.role == "discrete":  # categories, small ids the most common
            return np.floor(self.categories[columns] * expit(1.7 * z) ** 3)
        value = np.exp(self.mu[columns] + self.sigma[columns] * z)  # heavy-tailed, with exact zeros
        value = np.where(self.integer[columns], np.floor(value), value)
        return np.where(rng.random(value.shape) < self.sparsity[columns], 0.0, value)

    def assemble(self, by_level: dict[str, np.ndarray], example_level: np.ndarray) -> np.ndarray:
        out = np.empty((len(example_level), len(self.level)))
        for i, level in enumerate(LEVELS):
            out[:, self.level == i] = by_level.get(level, example_level)
        return out
