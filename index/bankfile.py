"""Querybank files: a bank shipped beside a model's weights (one safetensors file per modality).

``<folder>/<model>.querybank-<modality>.safetensors`` (:func:`bank_filename`) holds one tensor,
``vectors`` (float16 ``[B,D]``, or ``[B,K,D]`` for set models: half the bytes of float32 and,
for QB-Norm's log-normalisers, the same rankings), and string metadata: the model name, the
query modality, the weights hash of the model that encoded the rows, where the rows came from
(``source``), and the rows' texts (captions, or image ids) as a JSON list. The service loads a
file into its querybank store on first start (:mod:`service.seeding`); ``xmodal querybank
ship`` writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index.log import atomic_write_bytes

__all__ = ["BankFile", "bank_filename", "read_bank_file", "write_bank_file"]

FORMAT = "xmodal-querybank-v1"


@dataclass
class BankFile:
    """A shipped bank: float32 ``vectors`` (widened from the file's float16) and its facts."""

    vectors: np.ndarray
    texts: list[str]
    model: str
    modality: str
    weights_hash: str
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def bank_filename(model: str, modality: str) -> str:
    """The file name of ``model``'s shipped bank of ``modality`` queries."""
    return f"{model}.querybank-{modality}.safetensors"


def write_bank_file(
    path: Path,
    vectors: np.ndarray,
    texts: list[str],
    *,
    model: str,
    modality: str,
    weights_hash: str,
    source: str,
) -> int:
    """Write a bank file (vectors stored as float16), atomically. Returns its size in bytes."""
    from safetensors.numpy import save

    v = np.asarray(vectors)
    if v.ndim not in (2, 3) or len(v) != len(texts) or len(v) == 0:
        raise ValueError(f"need vectors [B,D] (or [B,K,D]) with B={len(texts)} > 0, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("bank vectors contain NaN or inf")
    meta = {
        "format": FORMAT,
        "model": model,
        "modality": modality,
        "weights_hash": weights_hash,
        "source": source,
        "rows": str(len(v)),
        "texts": json.dumps(list(texts)),
    }
    data = save({"vectors": np.ascontiguousarray(v, dtype=np.float16)}, metadata=meta)
    atomic_write_bytes(Path(path), data)
    return len(data)


def read_bank_file(path: Path) -> BankFile:
    """Read a bank file; rows are re-normalised to unit length after widening to float32
    (float16 rounding moves a norm by ~1e-3). Raises ValueError on a file that is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "vectors" not in set(f.keys()):
            raise ValueError(f"{path}: not an xmodal querybank file")
        vectors = f.get_tensor("vectors").astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
    texts = json.loads(meta["texts"])
    if len(texts) != len(vectors):
        raise ValueError(f"{path}: {len(vectors)} vectors but {len(texts)} texts")
    return BankFile(
        vectors=np.ascontiguousarray(vectors),
        texts=texts,
        model=meta["model"],
        modality=meta["modality"],
        weights_hash=meta["weights_hash"],
        source=meta.get("source", ""),
    )
