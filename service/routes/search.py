"""POST /search: text, image, video, raw-vector or item-id queries across modalities."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service import media, metrics
from service.deps import ReadAccess, ReadyState
from service.schemas import Modality, SearchRequest, SearchResponse, SearchResult, error_responses
from service.settings import MODALITIES
from service.state import ServiceState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["search"])

# What a query searches when the request names no targets: the other side of the bridge.
DEFAULT_TARGETS: dict[str, list[Modality]] = {
    "text": ["image", "video"],
    "image": ["text"],
    "video": ["text"],
    "vector": list(MODALITIES),
    "item_id": list(MODALITIES),
}
_FORM_FIELDS = {"text", "item_id", "targets", "top_k", "offset", "qbnorm", "min_score", "filter"}

_OPENAPI_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            # inlined: the route parses the body itself, so FastAPI does not register the model
            "application/json": {"schema": SearchRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "an image or video file to query with",
                        },
                        "targets": {"type": "string", "description": "comma-separated"},
                        "top_k": {"type": "integer"},
                        "offset": {"type": "integer"},
                        "qbnorm": {"type": "boolean"},
                        "min_score": {"type": "number"},
                        "filter": {"type": "string", "description": "a JSON object"},
                    },
                }
            },
        },
    }
}


def _bad(message: str, code: int = status.HTTP_400_BAD_REQUEST) -> HTTPException:
    return HTTPException(code, message)


async def _parse_request(request: Request, state: ServiceState) -> tuple[SearchRequest, Any]:
    """The validated request and, for multipart uploads, ``(kind, bytes)`` of the file."""
    content_type = request.headers.get("content-type", "").lower()
    upload: tuple[str, bytes] | None = None
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS) + 1)
        raw: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile
                if upload is not None:
                    raise _bad("upload one file per search")
                data = await value.read()
                kind = _media_kind(data, getattr(value, "content_type", None))
                upload = (kind, data)
            elif key not in _FORM_FIELDS:
                raise _bad(f"unknown form field {key!r}")
            else:
                raw[key] = value
        if upload is not None and ("text" in raw or "item_id" in raw):
            raise _bad("give exactly one of a file, text, item_id")
        raw = _coerce_form(raw)
        if upload is not None:
            raw[upload[0]] = ""  # placeholder so the one-query rule sees the upload
    elif content_type.startswith("application/json") or not content_type:
        body = await request.body()
        if not body:
            raise _bad("empty request body: send a JSON search request")
        try:
            raw = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"request body is not valid JSON: {exc}") from exc
        except RecursionError as exc:  # as /ingest (FastAPI's body parser) answers: 400
            raise _bad("request body is nested too deeply to parse") from exc
        if not isinstance(raw, dict):
            raise _bad("request body must be a JSON object")
    else:
        raise _bad(
            f"unsupported content type {content_type!r}: use application/json or "
            "multipart/form-data",
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        )
    try:
        req = SearchRequest.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=None) from exc
    if req.text is not None and upload is None:
        try:
            req.text = media.clean_text(req.text, state.settings.ingest.max_text_chars)
        except media.MediaError as exc:
            raise HTTPException(exc.status, f"text: {exc.message}") from exc
    return req, upload


def _coerce_form(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "targets":
            out[key] = [t.strip() for t in str(value).split(",") if t.strip()]
        elif key == "filter":
            try:
                out[key] = json.loads(value) if value else {}
            except ValueError as exc:
                raise _bad(f"filter is not a JSON object: {exc}") from exc
            except RecursionError as exc:
                raise _bad("filter is nested too deeply to parse") from exc
        elif key == "qbnorm" and str(value).lower() in ("", "null", "default"):
            out[key] = None
        else:
            out[key] = value  # pydantic coerces "10" -> 10, "true" -> True
    return out


def _media_kind(data: bytes, content_type: str | None) -> str:
    """'image' or 'video' for an uploaded file, by its declared type then its magic bytes."""
    if content_type and content_type.startswith("video/"):
        return "video"
    if content_type and content_type.startswith("image/"):
        return "image"
    head = data[:16]
    if (
        head[4:8] == b"ftyp"
        or head.startswith(b"\x1a\x45\xdf\xa3")
        or head[:4] == b"RIFF"
        and (data[8:12] == b"AVI ")
    ):
        return "video"
    return "image"


async def _query_vector(
    state: ServiceState, req: SearchRequest, upload: tuple[str, bytes] | None
) -> tuple[np.ndarray, str]:
    """Encode the query: ``(vector [D] or [K,D], query kind)``."""
    assert state.encoder is not None
    settings = state.settings.ingest
    max_bytes = int(settings.max_body_mb * 1024 * 1024)
    kind = upload[0] if upload is not None else req.query_kind
    try:
        if kind == "text":
            assert req.text is not None
            return await state.encoder.encode_text(req.text), "text"
        if kind == "image":
            raw = upload[1] if upload else media.decode_base64(req.image or "", max_bytes)
            image = await state.encoder.run(media.load_image, raw, settings)
            return await state.encoder.encode_image(image), "image"
        if kind == "video":
            raw = upload[1] if upload else media.decode_base64(req.video or "", max_bytes)
            video = await state.encoder.run(media.load_video, raw, settings)
            frames = [f for seg in video.segments for f in seg.frames]
            return await state.encoder.encode_video(frames), "video"
    except media.MediaError as exc:
        raise HTTPException(exc.status, f"{kind}: {exc.message}") from exc
    if kind == "vector":
        return _check_vector(state, req.vector), "vector"
    assert req.item_id is not None
    return _item_vector(state, req.item_id), "item_id"


def _check_vector(state: ServiceState, vector: Any) -> np.ndarray:
    assert state.model is not None
    dim, k = state.model.embed_dim, state.model.num_vectors
    try:
        v = np.asarray(vector, dtype=np.float64)
    except (ValueError, TypeError) as exc:  # ragged rows (the schema refuses them first)
        raise _bad(f"vector is not a rectangular array of numbers: {exc}", 422) from exc
    expected = f"[{dim}]" if k == 1 else f"[{k}, {dim}] (or [{dim}])"
    if v.shape[-1:] != (dim,) or v.ndim > 2 or (v.ndim == 2 and k == 1) or v.size == 0:
        raise _bad(f"vector has shape {list(v.shape)}, expected {expected}", 422)
    if v.ndim == 2 and v.shape[0] != k:
        raise _bad(f"vector has shape {list(v.shape)}, expected {expected}", 422)
    if not np.all(np.isfinite(v)):
        raise _bad("vector contains NaN or infinity", 422)
    return _unit_rows(v)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    """L2-normalise each row stably: scale by its max-abs first, in float64, so 1e20s do not
    overflow and 1e-30s do not underflow; only an exactly zero row is refused."""
    scale = np.max(np.abs(v), axis=-1, keepdims=True)
    if np.any(scale == 0):
        raise _bad("vector has zero norm", 422)
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
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"item {item_id!r} not found")


def _search_targets(
    state: ServiceState,
    q: np.ndarray,
    query_kind: str,
    targets: list[Modality],
    n: int,
    flt: dict[str, Any] | None,
    want_qbnorm: bool,
) -> tuple[list[tuple[Modality, Any, float, float]], bool]:
    """Blocking: search each target gallery, QB-Norm where it applies.

    Returns ``[(modality, hit, score, raw_score)]`` unsorted, and whether QB-Norm was applied.
    """
    out: list[tuple[Modality, Any, float, float]] = []
    applied = False
    qbnorm_here = want_qbnorm and query_kind == "text"
    for modality in targets:
        gallery = state.galleries[modality]
        if len(gallery) == 0:
            continue
        normalizer = state.normalizers.get(modality) if qbnorm_here else None
        t0 = time.perf_counter()
        if normalizer is not None:
            # QB-Norm's own search: an adaptive raw shortlist, normalised, top-n kept
            mode = state.settings.qbnorm.mode
            hits = normalizer.search(
                q, n, filter=flt or None, mode=mode if mode != "off" else "dis"
            )
            metrics.SEARCH_STAGE.labels("qbnorm").observe(time.perf_counter() - t0)
            applied = True
            out.extend(
                (modality, h, float(h.score if h.norm_score is None else h.norm_score), h.score)
                for h in hits[0]
            )
        else:
            hits = gallery.search(q, n, filter=flt or None)
            metrics.SEARCH_STAGE.labels("search").observe(time.perf_counter() - t0)
            out.extend((modality, h, float(h.score), float(h.score)) for h in hits[0])
    return out, applied


@router.post(
    "/search",
    response_model=SearchResponse,
    dependencies=[ReadAccess],
    openapi_extra=_OPENAPI_BODY,
    responses=error_responses(
        {
            400: "malformed request",
            404: "unknown item_id",
            413: "query media too large",
            415: "unsupported media",
            422: "invalid request",
            429: "overloaded; retry after Retry-After seconds",
            503: "not ready",
        }
    ),
)
async def search(request: Request, state: ReadyState) -> SearchResponse:
    """Search images, videos and texts with a text, image, video, vector or item id."""
    start = time.perf_counter()
    req, upload = await _parse_request(request, state)
    t0 = time.perf_counter()
    q, query_kind = await _query_vector(state, req, upload)
    if query_kind in ("text", "image", "video"):
        metrics.SEARCH_STAGE.labels("encode").observe(time.perf_counter() - t0)
    targets = req.targets or DEFAULT_TARGETS[query_kind]
    want_qbnorm = req.qbnorm if req.qbnorm is not None else state.settings.qbnorm.mode != "off"
    n = req.offset + req.top_k
    assert state.encoder is not None
    found, applied = await state.encoder.run(
        _search_targets, state, q, query_kind, targets, n, req.filter, want_qbnorm
    )
    t1 = time.perf_counter()
    # Merge across modalities: best score first, ties broken by id for a stable order.
    found.sort(key=lambda row: (-row[2], row[1].id))
    if req.min_score is not None:
        found = [row for row in found if row[2] >= req.min_score]
    page = found[req.offset : req.offset + req.top_k]
    results = [_result(state, modality, hit, score, raw) for modality, hit, score, raw in page]
    metrics.SEARCH_STAGE.labels("rerank").observe(time.perf_counter() - t1)
    metrics.SEARCHES.labels(query_kind, str(applied).lower()).inc()
    return SearchResponse(
        results=results,
        took_ms=round((time.perf_counter() - start) * 1000, 3),
        model=state.model_name,
        index_version=state.index_version(),
        querybank_version=state.serving_bank()[1],
        qbnorm_applied=applied,
    )


def _result(
    state: ServiceState, modality: Modality, hit: Any, score: float, raw: float
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
        metadata=metadata,
        start=start,
        end=end,
    )
