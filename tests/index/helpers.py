"""Small synthetic data for the index tests."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(
    n: int, dim: int, clusters: int = 32, spread: float = 0.35, seed: int = 0
) -> np.ndarray:
    """``n`` normalised vectors around ``clusters`` centres (so recall is meaningful)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(clusters, dim)))
    labels = rng.integers(0, clusters, n)
    noise = rng.normal(scale=spread / np.sqrt(dim), size=(n, dim))
    return unit(centres[labels] + noise)
