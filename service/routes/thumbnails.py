"""GET /items/{item_id}/thumbnail: the preview the worker stored (service/thumbnails.py).

Images answer their JPEG thumbnail, videos the poster frame of one segment (``segment=N``, or
the segment holding second ``at``; default the first), texts their text as ``text/plain``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from service.deps import ReadAccess, ReadyState
from service.schemas import error_responses
from service.state import ServiceState
from service.thumbnails import open_thumbnail_store

logger = logging.getLogger(__name__)

router = APIRouter(tags=["items"])


def thumbnail_store(request: Request, state: ServiceState) -> Any:
    """The app's store, opened on first use (files in embedded mode, Redis otherwise)."""
    store = getattr(request.app.state, "thumbnails", None)
    if store is None:
        store = open_thumbnail_store(state.settings)
        request.app.state.thumbnails = store
    return store


def _segment_at(segments: list[tuple[float, float]], at: float) -> int:
    """The segment holding second ``at`` (the last one that starts at or before it)."""
    index = 0
    for i, (start, _end) in enumerate(segments):
        if start <= at:
            index = i
    return index


@router.get(
    "/items/{item_id}/thumbnail",
    dependencies=[ReadAccess],
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {}, "text/plain": {}},
            "description": "a JPEG (images, video segments) or the text (text items)",
        },
        **error_responses({404: "unknown item, or no thumbnail stored", 503: "not ready"}),
    },
)
def get_thumbnail(
    item_id: str,
    request: Request,
    state: ReadyState,
    segment: Annotated[int | None, Query(ge=0, description="video segment index")] = None,
    at: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="video time, seconds")
    ] = None,
) -> Response:
    """A small preview of an indexed item: JPEG thumbnail, video poster frame, or text."""
    record = None
    for gallery in state.galleries.values():
        record = gallery.get(item_id)
        if record is not None:
            break
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"item {item_id!r} not found")
    if segment is not None and at is not None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "give segment or at, not both")
    part = segment or 0
    if at is not None and record.segments:
        part = _segment_at(list(record.segments), at)
    store = thumbnail_store(request, state)
    found = store.get(item_id, part)
    if found is None:
        count = store.count(item_id)
        if count and part >= count:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"item {item_id!r} has {count} segment(s); segment {part} does not exist",
            )
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"item {item_id!r} has no thumbnail (indexed before thumbnails were stored, "
            "or thumbnails are disabled)",
        )
    content_type, blob = found
    etag = '"' + hashlib.sha256(blob).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(blob, media_type=content_type, headers=headers)
