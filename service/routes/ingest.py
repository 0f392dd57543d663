"""POST /ingest (batch jobs, answered once durably queued) and GET /jobs/{job_id}."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, status

from service import media, metrics, monitoring
from service.deps import ReadAccess, ReadyState, WriteAccess
from service.handoff import DecodedPhotos
from service.heartbeat import waiting_hint
from service.schemas import (
    IngestItem,
    IngestRequest,
    IngestResponse,
    JobResponse,
    error_responses,
)
from service.settings import IngestSettings

logger = logging.getLogger(__name__)

router = APIRouter(tags=["ingest"])


def validate_item(
    item: IngestItem, settings: IngestSettings, handoff: DecodedPhotos | None = None
) -> dict[str, Any]:
    """Check one item now (so bad input is a synchronous 4xx) and build its queue payload.

    Images are decoded, the only way to catch a truncated or broken file: in full when
    ``handoff`` (embedded mode) keeps the picture for the worker, which then does not decode
    it again; else with ``media.verify_image`` (a JPEG at 1/8 scale, which still reads all of
    its data) and the worker decodes it in full. Videos are probed (container, stream,
    duration, frame size) and decoded by the worker. Raises MediaError with the status to
    answer.
    """
    resolved = media.resolve_item(
        {"modality": item.modality, "text": item.text, "data": item.data, "path": item.path},
        settings,
    )
    payload: dict[str, Any] = {"id": item.id, "modality": item.modality, "metadata": item.metadata}
    if resolved.text is not None:
        payload["text"] = resolved.text
    elif resolved.path is not None:
        payload["path"] = str(resolved.path)
    else:
        payload["data"] = item.data
        payload["content"] = resolved.raw  # decoded once: the queue spills these bytes
    if resolved.modality == "image":
        assert resolved.raw is not None
        _, width, height = media.check_image(resolved.raw, settings)  # the header only
        if handoff is not None and handoff.wants(width, height):
            handoff.put(resolved.content_hash, media.load_image(resolved.raw, settings))
        else:
            media.verify_image(resolved.raw, settings)
    elif resolved.modality == "video":
        assert resolved.raw is not None
        media.probe_video(resolved.raw, settings)
    payload["content_hash"] = resolved.content_hash
    return payload


def _validate_batch(
    items: list[IngestItem], settings: IngestSettings, handoff: DecodedPhotos | None
) -> list[dict[str, Any]]:
    payloads: list[dict[str, Any]] = []
    for item in items:
        try:
            payloads.append(validate_item(item, settings, handoff))
        except media.MediaError as exc:
            if handoff is not None:  # the batch is refused: nothing of it will be encoded
                handoff.discard(_digests(payloads))
            # name the item so a client can fix a batch of hundreds
            raise media.MediaError(f"item {item.id!r}: {exc.message}", exc.status) from exc
    return payloads


def _digests(payloads: list[dict[str, Any]]) -> list[str]:
    return [str(p["content_hash"]) for p in payloads if p["modality"] == "image"]


@router.post(
    "/ingest",
    response_model=IngestResponse,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriteAccess],
    responses=error_responses(
        {
            400: "malformed item (bad base64, path outside the media root)",
            413: "batch, body or media too large",
            415: "unsupported media format",
            422: "invalid item (corrupt media, empty or over-long text)",
            429: "ingest queue full; retry after Retry-After seconds",
            503: "not ready",
        }
    ),
)
async def ingest(body: IngestRequest, state: ReadyState) -> IngestResponse:
    """Queue a batch of items for indexing; 202 once it is durably queued."""
    settings = state.settings.ingest
    if len(body.items) > settings.max_batch_items:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"batch has {len(body.items)} items, over the limit of {settings.max_batch_items}",
        )
    await state.run(state.check_queue_capacity, len(body.items))
    payloads = await state.run(_validate_batch, body.items, settings, state.handoff)
    job_id = uuid.uuid4().hex
    try:
        await state.run(state.enqueue, job_id, payloads)
    except BaseException:
        if state.handoff is not None:  # not queued: nothing of it will be encoded
            state.handoff.discard(_digests(payloads))
        raise
    for item in body.items:
        metrics.ITEMS_ENQUEUED.labels(item.modality).inc()
    logger.info("queued job %s with %d items", job_id, len(payloads), extra={"job_id": job_id})
    return IngestResponse(job_id=job_id, accepted=len(payloads))


@router.get(
    "/jobs/{job_id}",
    response_model=JobResponse,
    dependencies=[ReadAccess],
    responses=error_responses({404: "unknown job", 503: "not ready"}),
)
async def get_job(job_id: str, state: ReadyState) -> JobResponse:
    """Per-item state of an ingest job."""
    assert state.jobs is not None
    job = await state.run(state.jobs.get, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id!r} not found")
    live = await state.run(monitoring.live_worker_names, state)  # None when embedded
    if live is None:
        return job  # the job stores answer with the API's JobResponse
    # Redis mode: say how many workers are live and whether the job waits for one that isn't
    hint = waiting_hint([it.state for it in job.items], len(live))
    return job.model_copy(update={"live_workers": len(live), "detail": hint})
