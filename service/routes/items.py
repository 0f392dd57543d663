"""GET and DELETE /items/{item_id}: indexed items."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, status

from service import metrics
from service.deps import ReadAccess, ReadyState, WriteAccess
from service.routes.thumbnails import thumbnail_store
from service.schemas import DeleteResponse, ItemResponse, Segment, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["items"])


@router.get(
    "/items/{item_id}",
    response_model=ItemResponse,
    dependencies=[ReadAccess],
    responses=error_responses({404: "not indexed (yet)", 503: "not ready"}),
)
def get_item(item_id: str, state: ReadyState) -> ItemResponse:
    """An indexed item: 200 once it is searchable, 404 before."""
    for modality, gallery in state.galleries.items():
        record = gallery.get(item_id)
        if record is not None:
            return ItemResponse(
                id=record.id,
                modality=modality,  # type: ignore[arg-type]
                metadata=dict(record.metadata),
                content_hash=record.content_hash,
                num_vectors=len(record.vectors),
                segments=[Segment(start=a, end=b) for a, b in record.segments]
                if record.segments
                else None,
            )
    raise HTTPException(status.HTTP_404_NOT_FOUND, f"item {item_id!r} not found")


@router.delete(
    "/items/{item_id}",
    response_model=DeleteResponse,
    dependencies=[WriteAccess],
    responses=error_responses({404: "unknown item", 503: "not ready"}),
)
async def delete_item(item_id: str, request: Request, state: ReadyState) -> DeleteResponse:
    """Remove an item from the index (every modality holding its id)."""
    holders = [m for m, g in state.galleries.items() if item_id in g]
    if not holders:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"item {item_id!r} not found")
    await state.run(state.remove_item, item_id, holders)
    await state.run(thumbnail_store(request, state).delete, item_id)
    metrics.ITEMS_DELETED.inc()
    logger.info("deleted item %s from %s", item_id, ",".join(holders))
    return DeleteResponse(id=item_id, deleted=True, modalities=holders)  # type: ignore[arg-type]
