"""The search layer: encode the query -> search each target gallery -> QB-Norm -> merge, page.

:func:`run_search` takes a parsed :class:`~service.schemas.SearchRequest` (and an uploaded
file, if any) and returns the page of results; ``routes/search.py`` only parses the request
and answers. QB-Norm here only *reads* ``state.normalizers``: refits happen on the background
refresher (:mod:`service.normalizers`), never on a search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from index.multivector import search_items
from service import media, metrics
from service.schemas import Modality, SearchRequest, SearchResult
from service.settings import MODALITIES
from service.state import ServiceState

R = TypeVar("R")


class SearchError(Exception):
    """A query the search cannot answer (bad vector, unknown item, bad media): ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class SearchOutcome:
    """One page of merged results, and what the search did."""

    results: list[SearchResult]
    query_kind: str
    qbnorm_applied: bool
    bank: str | None = None  # modality of the bank that normalises this query kind, if served


# One hit before paging: (modality, hit, score, raw score, calibrated probability or None).
Row = tuple[Modality, Any, float, float, float | None]

# What a query searches when the request names no targets: the other side of the bridge.
DEFAULT_TARGETS: dict[str, list[Modality]] = {
    "text": ["image", "video"],
    "image": ["text"],
    "video": ["text"],
    "vector": list(MODALITIES),
    "item_id": list(MODALITIES),
}


def query_kind(req: SearchRequest, upload: tuple[str, bytes] | None) -> str:
    """What the query is: ``text``, ``image``, ``video``, ``vector`` or ``item_id``."""
    return upload[0] if upload is not None else req.query_kind


async def encode_query(
    state: ServiceState,
    req: SearchRequest,
    upload: tuple[str, bytes] | None,
    then: Callable[[np.ndarray], R],
) -> R:
    """Encode the query and hand its vector (``[D]`` or ``[K,D]``) to ``then``, blocking work
    that runs on the pool in the same thread hop as the encode (one hop per search)."""
    assert state.encoder is not None
    settings = state.settings.ingest
    max_bytes = settings.max_body_bytes
    kind = query_kind(req, upload)
    try:
        if kind == "text":
            assert req.text is not None
            return await state.encoder.encode_text(req.text, then)  # type: ignore[no-any-return]
        if kind == "image":
            raw = upload[1] if upload else media.decode_base64(req.image or "", max_bytes)
            image = await state.encoder.run(media.load_image, raw, settings)
            return await state.encoder.encode_image(image, then)  # type: ignore[no-any-return]
        if kind == "video":
            raw = upload[1] if upload else media.decode_base64(req.video or "", max_bytes)
            video = await state.encoder.run(media.load_video, raw, settings)
            frames = [f for seg in video.segments for f in seg.frames]
            return await state.encoder.encode_video(frames, then)  # type: ignore[no-any-return]
    except media.MediaError as exc:
        raise SearchError(f"{kind}: {exc.message}", exc.status) from exc
    if kind == "vector":
        return await state.encoder.run(then, _check_vector(state, req.vector))
    assert req.item_id is not None
    return await state.encoder.run(then, _item_vector(state, req.item_id))


def _check_vector(state: ServiceState, vector: Any) -> np.ndarray:
    assert state.model is not None
    dim, k = state.model.embed_dim, state.model.num_vectors
    try:
        v = np.asarray(vector, dtype=np.float64)
    except (ValueError, TypeError) as exc:  # ragged rows (the schema refuses them first)
        raise SearchError(f"vector is not a rectangular array of numbers: {exc}", 422) from exc
    expected = f"[{dim}]" if k == 1 else f"[{k}, {dim}] (or [{dim}])"
    if v.shape[-1:] != (dim,) or v.ndim > 2 or (v.ndim == 2 and k == 1) or v.size == 0:
        raise SearchError(f"vector has shape {list(v.shape)}, expected {expected}", 422)
    if v.ndim == 2 and v.shape[0] != k:
        raise SearchError(f"vector has shape {list(v.shape)}, expected {expected}", 422)
    if not np.all(np.isfinite(v)):
        raise SearchError("vector contains NaN or infinity", 422)
    return _unit_rows(v)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    """L2-normalise each row stably: scale by its max-abs first, in float64, so 1e20s do not
    overflow and 1e-30s do not underflow; only an exactly zero row is refused."""
    scale = np.max(np.abs(v), axis=-1, keepdims=True)
    if np.any(scale == 0):
        raise SearchError("vector has zero norm", 422)
    scaled = v / scale
    return np.ascontiguousarray(
        scaled / np.linalg.norm(scaled, axis=-1, keepdims=True), dtype=np.float32
    )


def _item_vector(state: ServiceState, item_id: str) -> np.ndarray:
    for gallery in state.galleries.values():
        record = gallery.get(item_id)
        if record is None:
            continue
        vectors = np.asarray(record.vectors, dtype=np.float32)
        assert state.model is not None
        if state.model.num_vectors > 1:
            return vectors  # [K, D] set: searched as a set
        # one vector per video segment: the item as a whole is their normalised mean
        v = vectors.mean(axis=0)
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)
    raise SearchError(f"item {item_id!r} not found", 404)


def search_targets(
    state: ServiceState,
    q: np.ndarray,
    query_kind: str,
    targets: list[Modality],
    n: int,
    flt: dict[str, Any] | None,
    want_qbnorm: bool,
) -> tuple[list[Row], bool]:
    """Blocking: search each target gallery, QB-Norm where it applies (the bank of the
    query's modality, :meth:`ServiceState.bank_for`, over the galleries it normalises).

    Returns ``[(modality, hit, score, raw_score, probability)]`` unsorted, and whether QB-Norm
    was applied. ``probability`` (the model's calibrated ``P(right)``, :mod:`index.calibration`)
    is set for the hits QB-Norm normalised when the model ships a calibration, else None.
    """
    out: list[Row] = []
    applied = False
    bank = state.bank_for(query_kind) if want_qbnorm else None
    normalizers = state.normalizers.get(bank, {}) if bank is not None else {}
    calibration = state.calibration if bank is not None else None
    for modality in targets:
        gallery = state.galleries[modality]
        if len(gallery) == 0:
            continue
        normalizer = normalizers.get(modality)
        t0 = time.perf_counter()
        if normalizer is not None:
            # QB-Norm's own search: an adaptive raw shortlist, normalised, top-n kept
            mode = state.settings.qbnorm.mode
            # a calibrated probability needs the margin to the next hit: at least two hits
            wanted = max(n, 2) if calibration is not None else n
            hits = normalizer.search(
                q, wanted, filter=flt or None, mode=mode if mode != "off" else "dis"
            )
            metrics.SEARCH_STAGE.labels("qbnorm").observe(time.perf_counter() - t0)
            applied = True
            row = hits[0]
            raw = np.array([h.score for h in row], dtype=np.float64)
            norm = np.array([h.score if h.norm_score is None else h.norm_score for h in row])
            probs = calibration.probability(bank, raw, norm) if calibration and bank else None
            out.extend(
                (modality, h, float(norm[i]), h.score, None if probs is None else float(probs[i]))
                for i, h in enumerate(row)
            )
        else:
            hits = search_items(gallery, q, n, filter=flt or None)
            metrics.SEARCH_STAGE.labels("search").observe(time.perf_counter() - t0)
            out.extend((modality, h, float(h.score), float(h.score), None) for h in hits[0])
    return out, applied


async def run_search(
    state: ServiceState, req: SearchRequest, upload: tuple[str, bytes] | None = None
) -> SearchOutcome:
    """Encode, search every target (QB-Norm where it applies), merge and cut the page."""
    t0 = time.perf_counter()
    kind = query_kind(req, upload)
    targets = req.targets or DEFAULT_TARGETS[kind]
    want_qbnorm = req.qbnorm if req.qbnorm is not None else state.settings.qbnorm.mode != "off"
    n = req.offset + req.top_k

    def search(q: np.ndarray) -> tuple[list[Row], bool]:
        # on the pool, straight after the encode
        if kind in ("text", "image", "video"):
            metrics.SEARCH_STAGE.labels("encode").observe(time.perf_counter() - t0)
        return search_targets(state, q, kind, targets, n, req.filter, want_qbnorm)

    found, applied = await encode_query(state, req, upload, search)
    t1 = time.perf_counter()
    page = merge_and_page(found, req.offset, req.top_k, req.min_score, req.min_probability)
    results = [_result(state, *row) for row in page]
    metrics.SEARCH_STAGE.labels("rerank").observe(time.perf_counter() - t1)
    metrics.SEARCHES.labels(kind, str(applied).lower()).inc()
    return SearchOutcome(
        results=results, query_kind=kind, qbnorm_applied=applied, bank=state.bank_for(kind)
    )


def merge_and_page(
    found: list[Row],
    offset: int,
    top_k: int,
    min_score: float | None,
    min_probability: float | None = None,
) -> list[Row]:
    """Merge across modalities: best score first, ties broken by id for a stable order; drop
    rows under ``min_score``, and under ``min_probability`` (rows without a probability too);
    the ``[offset, offset + top_k)`` page."""
    found = sorted(found, key=lambda row: (-row[2], row[1].id))
    if min_score is not None:
        found = [row for row in found if row[2] >= min_score]
    if min_probability is not None:
        found = [row for row in found if row[4] is not None and row[4] >= min_probability]
    return found[offset : offset + top_k]


def _result(
    state: ServiceState,
    modality: Modality,
    hit: Any,
    score: float,
    raw: float,
    probability: float | None,
) -> SearchResult:
    record = state.galleries[modality].get(hit.id)
    metadata = dict(record.metadata) if record is not None else {}
    start = end = None
    if record is not None and record.segments and hit.segment is not None:
        start, end = record.segments[hit.segment]
    return SearchResult(
        id=hit.id,
        modality=modality,
        score=score,
        raw_score=raw,
        probability=probability,
        metadata=metadata,
        start=start,
        end=end,
    )


__all__ = [
    "DEFAULT_TARGETS",
    "SearchError",
    "SearchOutcome",
    "encode_query",
    "merge_and_page",
    "query_kind",
    "run_search",
    "search_targets",
]
