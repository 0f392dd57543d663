"""Gallery data: the item record, search results and the index knobs (no compute here).

:class:`Record` is one stored item (``K`` L2-normalised vectors plus metadata),
:class:`Hit` one item-level search result, :class:`Candidates` the same results as arrays
(the fast path for large shortlists), and :class:`GalleryConfig` the index and durability
knobs a :class:`index.gallery.Gallery` is opened with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field


class GalleryConfig(BaseModel):
    """Index knobs for one gallery (nested in the service ``Settings`` as ``index``)."""

    factory: str = Field(
        default="auto",
        description='FAISS factory string ("Flat", "HNSW32", "IVF4096,PQ64,RFlat", ...) or '
        '"auto": exact below auto_threshold vectors, HNSW32 below ivfpq_threshold, else IVF-PQ '
        "(set galleries: exact below set_auto_threshold, IVF with fp16 lists below "
        "ivfpq_threshold)",
    )
    auto_threshold: int = Field(
        default=50_000, description="auto: exact search below this many vectors"
    )
    ivfpq_threshold: int = Field(
        default=1_000_000, description="auto: IVF-PQ at or above this many"
    )
    set_auto_threshold: int = Field(
        default=20_000,
        description="auto, set galleries (K slot vectors per item): exact slot index below "
        "this many slot vectors, IVF with fp16 lists at or above (a set query reads hundreds "
        "of slot neighbours per slot, which IVF serves far cheaper than HNSW)",
    )
    set_min_recall: float = Field(
        default=0.975,
        description="set galleries: slot recall@(10*K) vs exact kept at (re)build, i.e. the "
        "slots of the 10 best items (tracks set recall@10 vs brute-force Smooth-Chamfer)",
    )
    ef_search: int = Field(
        default=64, description="HNSW efSearch start value (raised to min_recall)"
    )
    nprobe: int = Field(default=16, description="IVF nprobe start value (raised to min_recall)")
    min_recall: float = Field(default=0.95, description="recall@10 vs exact kept at (re)build")
    recall_sample: int = Field(default=200, description="queries sampled to measure recall@10")
    use_gpu: bool | None = Field(default=None, description="None = use a GPU when faiss has one")
    snapshot_every: int = Field(
        default=10_000, description="log records between automatic snapshots"
    )
    fsync: bool = Field(default=True, description="fsync the log and snapshots (off only in tests)")
    search_threads: int = Field(
        default=1,
        ge=0,
        description="OpenMP threads of one FAISS search on the API's pool threads (0 = FAISS's "
        "default): queries run in parallel on the pool, and an OpenMP team per single query "
        "costs more than it saves on a busy CPU",
    )


@dataclass
class Record:
    """One item: ``vectors [K,D]`` float32, L2-normalised (one per segment or slot)."""

    id: str
    vectors: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""
    segments: list[tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        self.vectors = v
        if self.segments is not None:
            self.segments = [(float(a), float(b)) for a, b in self.segments]
        if not self.content_hash:
            self.content_hash = content_hash(self.vectors, self.metadata, self.segments)


def content_hash(
    vectors: np.ndarray, metadata: dict[str, Any], segments: list[tuple[float, float]] | None
) -> str:
    """Default content hash: sha1 of the vectors, metadata and segments."""
    h = hashlib.sha1(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    h.update(json.dumps([metadata, segments], sort_keys=True, default=str).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Hit:
    """One search result. ``score``: raw cosine (or Smooth-Chamfer for set models);
    ``segment``: index of the winning segment for segmented items; ``norm_score``: the
    QB-Norm score when a normaliser was applied (see ``index.qbnorm``)."""

    id: str
    score: float
    segment: int | None = None
    norm_score: float | None = None


@dataclass(frozen=True)
class Candidates:
    """Item-level search results as arrays, best first: dense item indexes (see
    :meth:`Gallery.item_id`), raw scores and the winning vector slot per item."""

    idx: np.ndarray
    scores: np.ndarray
    slots: np.ndarray


Listener = Callable[[list[Record], list[str]], None]
