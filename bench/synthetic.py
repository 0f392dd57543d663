"""Synthetic gallery data shared by the benchmarks: clustered, L2-normalised vectors."""

from __future__ import annotations

import numpy as np

CHUNK = 100_000  # rows generated at a time, so 1M x 512 never needs a float64 copy


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 1000) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (so recall@k is meaningful)."""
    centres = unit(rng.normal(size=(clusters, dim)))
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        noise = rng.normal(scale=0.6 / np.sqrt(dim), size=(m, dim))
        out[s : s + m] = unit(centres[rng.integers(0, clusters, m)] + noise)
    return out
