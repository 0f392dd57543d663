"""Calibrated scores: ``P(right)`` of a hit from its raw and QB-Norm scores (issue #11).

Raw cosines of right and wrong answers overlap across queries, so no single ``min_score``
works for every query. A per-model logistic fit, ``P = sigmoid(w · f + b)`` over the
:data:`FEATURES` of a (query, item) pair, turns them into a probability that means the same for
every query. Coefficients are fitted on dev (``xmodal eval --calibration``) per bank modality
(``text``: text queries normalised by the text bank; ``image``: image queries of texts) and
shipped beside the weights as ``<model>.calibration.json`` with the weights hash they belong to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FEATURES", "ScoreCalibration", "calibration_filename", "pair_features", "sigmoid"]

FORMAT = "xmodal-calibration-v1"
# Features of a (query, item) pair: raw cosine, QB-Norm score (Hit.norm_score), and the margin
# of the raw cosine to the query's best *other* item in the same gallery.
FEATURES = ("raw", "qbnorm", "margin")


def calibration_filename(model: str) -> str:
    """The file name of ``model``'s shipped score calibration."""
    return f"{model}.calibration.json"


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow at any ``z``."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64))))


def pair_features(raw: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """``[..., G, len(FEATURES)]`` float64 features of score rows ``raw``/``norm [..., G]`` (a
    row = one query's scores over one gallery, or over its shortlist; G >= 2)."""
    raw = np.asarray(raw, dtype=np.float64)
    order = np.argsort(-raw, axis=-1, kind="stable")
    best = np.take_along_axis(raw, order[..., :1], -1)
    second = np.take_along_axis(raw, order[..., 1:2], -1) if raw.shape[-1] > 1 else best
    is_top = np.zeros(raw.shape, dtype=bool)
    np.put_along_axis(is_top, order[..., :1], True, -1)
    margin = raw - np.where(is_top, second, best)
    return np.stack([raw, np.asarray(norm, dtype=np.float64), margin], axis=-1)


@dataclass
class ScoreCalibration:
    """Per bank modality, logistic coefficients ``(weights [len(FEATURES)], bias)``."""

    model: str
    weights_hash: str
    coefficients: dict[str, tuple[np.ndarray, float]]
    meta: dict[str, Any] = field(default_factory=dict)

    def probability(self, bank: str, raw: np.ndarray, norm: np.ndarray) -> np.ndarray | None:
        """``P(right)`` of each hit of one query in one gallery (``raw``/``norm [G]``), or None
        when there are no coefficients for ``bank``."""
        coef = self.coefficients.get(bank)
        if coef is None or len(raw) == 0:
            return None
        w, b = coef
        return sigmoid(pair_features(raw, norm) @ w + b)

    def save(self, path: Path) -> None:
        body = {
            "format": FORMAT,
            "model": self.model,
            "weights_hash": self.weights_hash,
            "features": list(FEATURES),
            "coefficients": {
                k: {"weights": [float(x) for x in w], "bias": float(b)}
                for k, (w, b) in self.coefficients.items()
            },
            **self.meta,
        }
        Path(path).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ScoreCalibration:
        """Read a calibration file; ValueError when it is not one (or its features differ)."""
        body = json.loads(Path(path).read_text(encoding="utf-8"))
        if body.get("format") != FORMAT or tuple(body.get("features", ())) != FEATURES:
            raise ValueError(f"{path}: not an xmodal calibration of features {FEATURES}")
        coefficients = {
            k: (np.asarray(v["weights"], dtype=np.float64), float(v["bias"]))
            for k, v in body["coefficients"].items()
        }
        meta = {
            k: v
            for k, v in body.items()
            if k not in ("format", "model", "weights_hash", "features", "coefficients")
        }
        return cls(body["model"], body["weights_hash"], coefficients, meta)
