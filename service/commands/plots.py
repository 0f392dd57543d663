"""Pictures of results: recall@K curves (``xmodal eval --plot``) and the bench scripts'
latency / throughput charts (``bench/index.py --plot``, ``bench/qbnorm.py --plot``).

matplotlib with the Agg backend (no display needed); every function writes one PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recall_at_k(ranks: np.ndarray, max_k: int = 50) -> np.ndarray:
    """``R@K`` in percent for K = 1..max_k from 0-based ranks of the right answer."""
    ranks = np.asarray(ranks)
    ks = np.arange(1, max_k + 1)
    return np.array([100.0 * float(np.mean(ranks < k)) for k in ks])


def plot_recall_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str, max_k: int = 50
) -> Path:
    """One panel per direction (``{"text -> image": {"raw": ranks, "QB-Norm": ranks}}``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    ks = np.arange(1, max_k + 1)
    for ax, (direction, series) in zip(axes[0], curves.items(), strict=True):
        for (label, ranks), style in zip(series.items(), ("-", "--", ":"), strict=False):
            r = recall_at_k(ranks, max_k)
            ax.plot(ks, r, style, label=f"{label} (R@1 {r[0]:.1f}, R@10 {r[9]:.1f})")
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 5, 10, 20, 50])
        ax.set_xticklabels(["1", "2", "5", "10", "20", "50"])
        ax.set_xlabel("K")
        ax.set_ylabel("recall@K (%)")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
        ax.set_title(direction)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def _bars(
    ax: Any,
    labels: Sequence[str],
    groups: Mapping[str, Sequence[float]],
    ylabel: str,
    log: bool = False,
) -> None:
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(groups))
    for i, (name, values) in enumerate(groups.items()):
        bars = ax.bar(x + (i - (len(groups) - 1) / 2) * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8, rotation=10)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=8)


def plot_index_bench(result: Mapping[str, Any], path: Path) -> Path:
    """``bench/index.py`` output: latency p50/p99, queries/s, recall@10 and build time."""
    plt = _pyplot()
    rows = result["results"]
    labels = [str(r["index"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _bars(
        axes[0],
        labels,
        {"p50": [r["p50_ms"] for r in rows], "p99": [r["p99_ms"] for r in rows]},
        "latency per query (ms, log)",
        log=True,
    )
    _bars(axes[1], labels, {"qps": [1000.0 / r["p50_ms"] for r in rows]}, "queries/s (1 / p50)")
    _bars(
        axes[2],
        labels,
        {
            "recall@10": [r["recall@10"] for r in rows],
            "build s / 100": [r["build_s"] / 100 for r in rows],
        },
        "recall@10 vs exact; build time / 100 s",
    )
    axes[2].set_ylim(0, 1.1)
    fig.suptitle(
        f"bench/index.py: {result['gallery']:,} x {result['dim']}-d vectors, "
        f"{result['queries']} single-vector queries, 1 thread",
        fontsize=10,
    )
    return _save(fig, plt, path)


def plot_qbnorm_bench(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """``bench/qbnorm.py`` outputs (one per gallery size): latency of plain search, ours and
    the dense form (log scale), and ours' queries/s."""
    plt = _pyplot()
    labels = [f"{r['gallery']:,} items" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _bars(
        axes[0],
        labels,
        {
            "plain search": [r["plain_ms"] for r in results],
            "QB-Norm (ours)": [r["ours_ms"] for r in results],
            "QB-Norm dense": [r["dense_ms"] for r in results],
        },
        "median latency per query (ms, log)",
        log=True,
    )
    _bars(
        axes[1],
        labels,
        {
            "plain": [1000.0 / r["plain_ms"] for r in results],
            "ours": [1000.0 / r["ours_ms"] for r in results],
        },
        "queries/s (1 / median)",
    )
    bank = results[0]["bank"]
    fig.suptitle(f"bench/qbnorm.py: bank of {bank:,} queries, exact Flat gallery", fontsize=10)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
