"""Plots: recall@K from ranks, and the PNGs the eval/bench commands write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.commands import plots

pytest.importorskip("matplotlib", reason="plots need matplotlib")


def test_recall_at_k_counts_ranks_below_k() -> None:
    ranks = np.array([0, 0, 1, 4, 9, 60])
    r = plots.recall_at_k(ranks, max_k=10)
    assert r.shape == (10,)
    assert r[0] == pytest.approx(100 * 2 / 6)  # R@1: ranks 0, 0
    assert r[4] == pytest.approx(100 * 4 / 6)  # R@5: ranks < 5
    assert r[9] == pytest.approx(100 * 5 / 6)  # R@10: all but 60
    assert np.all(np.diff(r) >= 0)


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plots_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    curves = {
        "text -> image": {"raw": rng.integers(0, 100, 500), "QB-Norm": rng.integers(0, 50, 500)}
    }
    w, h = _png_size(plots.plot_recall_curves(curves, tmp_path / "r.png", "t"))
    assert w > 300 and h > 200
    index = {
        "gallery": 1000,
        "dim": 64,
        "queries": 10,
        "results": [
            {"index": "Flat", "p50_ms": 1.0, "p99_ms": 2.0, "recall@10": 1.0, "build_s": 0.1},
            {"index": "HNSW32", "p50_ms": 0.2, "p99_ms": 1.0, "recall@10": 0.97, "build_s": 3},
        ],
    }
    assert _png_size(plots.plot_index_bench(index, tmp_path / "i.png"))[0] > 300
    qb = [{"gallery": 10_000, "bank": 5000, "plain_ms": 1.8, "ours_ms": 3.3, "dense_ms": 4137}]
    assert _png_size(plots.plot_qbnorm_bench(qb, tmp_path / "q.png"))[0] > 300
