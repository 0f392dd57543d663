"""Does one ``min_score`` work across queries? The score-threshold study of ``xmodal eval
--calibration``.

For one direction (text->image or image->text) on a split: every (query, gallery item) pair has
a raw cosine, the QB-Norm score the service returns (``index.qbnorm.normalised_scores``) and
a label (the item is a right answer of the query). Queries are split deterministically into
two halves by their image (even image index: half A, odd: half B). On half A one global
threshold is chosen per score (the one maximising F1 of "the pair scores at or above it");
on half B we report precision (of the pairs above it, the share that are right) and recall (of
the right pairs, the share above it) at that threshold.

A calibrated score is fitted on half A too: a logistic regression of "right" on features of
the pair (:data:`index.calibration.FEATURES`), so its output is a probability; its threshold
is chosen the same way and reported on half B, with its calibration error (expected
|P - observed rate| over 10 bins).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.calibration import FEATURES, pair_features, sigmoid

__all__ = [
    "FEATURES",
    "Study",
    "best_f1_threshold",
    "fit_logistic",
    "pair_features",
    "plot_study",
    "run_study",
]


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iterations: int = 50
) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method (IRLS): ``(weights, bias)`` of
    ``P(y=1) = sigmoid(x @ w + b)``; a tiny L2 penalty on ``w`` keeps it well posed."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(xb.shape[1])
    w[-1] = np.log(max(y.mean(), 1e-9) / max(1 - y.mean(), 1e-9))
    penalty = np.full(xb.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        z = xb @ w
        p = sigmoid(z)
        grad = xb.T @ (p - y) + penalty * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w[:-1], float(w[-1])


def predict(x: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    """``sigmoid(x @ weights + bias)``."""
    return sigmoid(np.asarray(x, dtype=np.float64) @ np.asarray(weights) + bias)


def pr_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, precision, recall)`` of "score >= threshold", thresholds descending
    (ties: one point per distinct score)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    tp = np.cumsum(y)
    n = np.arange(1, len(s) + 1)
    last = np.r_[s[1:] != s[:-1], True]  # the last index of each distinct score
    return s[last], tp[last] / n[last], tp[last] / max(1.0, y.sum())


def best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold whose F1 is highest (ties: the higher threshold)."""
    t, p, r = pr_curve(scores, labels)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    return float(t[int(np.argmax(f1))])


def at_threshold(scores: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    """Precision, recall and F1 of "score >= t"."""
    above = scores >= t
    tp = float((above & labels).sum())
    precision = tp / max(1.0, float(above.sum()))
    recall = tp / max(1.0, float(labels.sum()))
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1}


def calibration_error(p: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-count bins of ``p`` (pairs with p < 1e-3, the
    vast mass of obvious negatives, are left out so the bins describe the scores that matter)."""
    keep = p >= 1e-3
    p, y = p[keep], labels[keep].astype(np.float64)
    if len(p) == 0:
        return 0.0
    order = np.argsort(p)
    err = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            err += len(chunk) * abs(float(p[chunk].mean()) - float(y[chunk].mean()))
    return err / len(p)


@dataclass
class Study:
    """One direction's study: thresholds chosen on half A, results on half B."""

    direction: str
    thresholds: dict[str, float]
    half_b: dict[str, dict[str, float]]
    weights: np.ndarray
    bias: float
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # on half B
    ece: float

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, res in self.half_b.items():
            out.update({f"{self.direction}_{name}_{k}": round(v, 4) for k, v in res.items()})
            out[f"{self.direction}_{name}_threshold"] = round(self.thresholds[name], 4)
        out[f"{self.direction}_calibrated_ece"] = round(self.ece, 4)
        return out


def run_study(
    direction: str,
    raw: np.ndarray,
    norm: np.ndarray,
    right: np.ndarray,
    query_image: np.ndarray,
) -> Study:
    """The study of one direction: ``raw``/``norm``/``right`` are ``[Q, G]`` (queries x gallery)
    and ``query_image[q]`` is the image index query ``q`` belongs to (its half)."""
    half_a = query_image % 2 == 0
    feats = pair_features(raw, norm)
    labels = np.asarray(right, dtype=bool)
    xa, ya = feats[half_a].reshape(-1, feats.shape[-1]), labels[half_a].ravel()
    xb, yb = feats[~half_a].reshape(-1, feats.shape[-1]), labels[~half_a].ravel()
    weights, bias = fit_logistic(xa, ya)
    scores_a = {"raw": xa[:, 0], "qbnorm": xa[:, 1], "calibrated": predict(xa, weights, bias)}
    scores_b = {"raw": xb[:, 0], "qbnorm": xb[:, 1], "calibrated": predict(xb, weights, bias)}
    thresholds = {k: best_f1_threshold(v, ya) for k, v in scores_a.items()}
    half_b = {k: at_threshold(v, yb, thresholds[k]) for k, v in scores_b.items()}
    curves = {k: pr_curve(v, yb) for k, v in scores_b.items()}
    ece = calibration_error(scores_b["calibrated"], yb)
    return Study(direction, thresholds, half_b, weights, bias, curves, ece)


def plot_study(studies: list[Study], path: Path, title: str) -> Path:
    """Precision-recall curves on half B per direction, the half-A threshold of each score
    marked (one ``min_score`` for every query: where it lands on unseen queries)."""
    from service.commands.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4.2), squeeze=False)
    names = {"raw": "raw cosine", "qbnorm": "QB-Norm score", "calibrated": "calibrated P"}
    for ax, st in zip(axes[0], studies, strict=True):
        for (key, (t, p, r)), style in zip(st.curves.items(), ("-", "--", ":"), strict=True):
            pick = np.unique(np.geomspace(1, len(t), 3000).astype(int)) - 1  # dense at the top
            (line,) = ax.plot(r[pick], p[pick], style, label=names[key])
            res = st.half_b[key]
            ax.plot(
                [res["recall"]],
                [res["precision"]],
                "o",
                color=line.get_color(),
                label=f"  threshold {st.thresholds[key]:.3g}: P {res['precision']:.2f} "
                f"R {res['recall']:.2f}",
            )
        ax.set_xlabel("recall (right pairs above the threshold)")
        ax.set_ylabel("precision (pairs above that are right)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{st.direction}: half B (threshold chosen on half A)")
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)
