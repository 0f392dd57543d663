"""Operator routes: limits, recent jobs, dead letters (list, requeue), snapshots, item hashes.

- ``GET /limits``: what one ``POST /ingest`` may carry (the client splits batches by it).
- ``POST /items/hashes``: ``{id: content_hash}`` of the given ids that are indexed, so a
  client can skip unchanged files without one ``GET /items/{id}`` each.
- ``GET /jobs?limit=N``: the newest jobs with per-state counts.
- ``GET /dead-letters`` and ``POST /dead-letters/requeue``.
- ``POST /snapshots``: a consistent snapshot (galleries + WAL + querybank + manifest),
  answered as a tar stream; restore it offline with ``xmodal snapshot restore``.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask

from service.deps import ReadAccess, ReadyState, WriteAccess
from service.schemas import ITEM_ID_PATTERN, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])


class LimitsResponse(BaseModel):
    max_batch_items: int
    max_body_bytes: int
    max_text_chars: int
    model: str


class HashesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(min_length=1, max_length=1000)


class HashesResponse(BaseModel):
    hashes: dict[str, str] = Field(description="indexed ids only: id -> content hash")
    modalities: dict[str, str] = Field(default_factory=dict)


class JobSummary(BaseModel):
    job_id: str
    state: str
    created_at: float
    items: int
    counts: dict[str, int]
    errors: dict[str, str] = Field(default_factory=dict, description="failed item -> reason")


class JobsResponse(BaseModel):
    jobs: list[JobSummary]


class DeadLetterOut(BaseModel):
    message_id: str
    job_id: str
    item_id: str | None
    modality: str | None
    error: str
    deliveries: int
    at: float
    requeueable: bool


class DeadLettersResponse(BaseModel):
    total: int
    dead_letters: list[DeadLetterOut]


class RequeueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] | None = Field(None, description="message ids to requeue")
    all: bool = Field(False, description="requeue every dead letter")

    @model_validator(mode="after")
    def _one(self) -> RequeueRequest:
        if (self.ids is None) == (not self.all):
            raise ValueError("give either ids or all=true")
        return self


class RequeueResponse(BaseModel):
    job_id: str | None
    requeued: list[str]
    skipped: dict[str, str]
    not_found: list[str]


@router.get("/limits", response_model=LimitsResponse, dependencies=[ReadAccess])
async def limits(state: ReadyState) -> LimitsResponse:
    """The ingest limits a client must split its batches by."""
    s = state.settings.ingest
    return LimitsResponse(
        max_batch_items=s.max_batch_items,
        max_body_bytes=int(s.max_body_mb * 2**20),
        max_text_chars=s.max_text_chars,
        model=state.model_name,
    )


@router.post(
    "/items/hashes",
    response_model=HashesResponse,
    dependencies=[ReadAccess],
    responses=error_responses({422: "invalid ids", 503: "not ready"}),
)
async def item_hashes(body: HashesRequest, state: ReadyState) -> HashesResponse:
    """Content hashes of those ``ids`` that are indexed (unknown ids are left out)."""
    import re

    pattern = re.compile(ITEM_ID_PATTERN)
    hashes: dict[str, str] = {}
    modalities: dict[str, str] = {}
    for item_id in body.ids:
        if not pattern.match(item_id):
            continue
        for modality, gallery in state.galleries.items():
            record = gallery.get(item_id)
            if record is not None:
                hashes[item_id] = record.content_hash
                modalities[item_id] = modality
                break
    return HashesResponse(hashes=hashes, modalities=modalities)


def _recent_jobs(state: Any, limit: int) -> list[JobSummary]:
    recent = getattr(state.jobs, "recent", None)
    if not callable(recent):
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, "this job store cannot list jobs")
    out = []
    for job_id, created in recent(limit):
        job = state.jobs.get(job_id)
        if job is None:
            continue
        counts: dict[str, int] = {}
        errors: dict[str, str] = {}
        for it in job.items:
            counts[it.state] = counts.get(it.state, 0) + 1
            if it.state == "failed" and len(errors) < 20:
                errors[it.id] = it.error or "failed"
        out.append(
            JobSummary(
                job_id=job_id,
                state=job.state,
                created_at=created,
                items=len(job.items),
                counts=counts,
                errors=errors,
            )
        )
    return out


@router.get(
    "/jobs",
    response_model=JobsResponse,
    dependencies=[ReadAccess],
    responses=error_responses({503: "not ready"}),
)
async def list_jobs(state: ReadyState, limit: int = Query(20, ge=1, le=1000)) -> JobsResponse:
    """The newest ingest jobs, newest first, with item counts per state."""
    return JobsResponse(jobs=await state.run(_recent_jobs, state, limit))


def _dead_letters(state: Any, limit: int) -> DeadLettersResponse:
    letters = state.queue.list_dead_letters(count=limit)
    out = []
    for d in reversed(letters):  # newest first
        item = d.item
        requeueable = bool(item.get("blob")) or any(
            item.get(k) is not None for k in ("text", "path", "data")
        )
        out.append(
            DeadLetterOut(
                message_id=d.message_id,
                job_id=d.job_id,
                item_id=item.get("id"),
                modality=item.get("modality"),
                error=d.error,
                deliveries=d.deliveries,
                at=d.at,
                requeueable=requeueable,
            )
        )
    return DeadLettersResponse(total=int(state.queue.dead_letters()), dead_letters=out)


@router.get(
    "/dead-letters",
    response_model=DeadLettersResponse,
    dependencies=[ReadAccess],
    responses=error_responses({503: "not ready"}),
)
async def list_dead_letters(
    state: ReadyState, limit: int = Query(100, ge=1, le=10_000)
) -> DeadLettersResponse:
    """Items parked after repeated failures, newest first, with their last error."""
    return await state.run(_dead_letters, state, limit)


@router.post(
    "/dead-letters/requeue",
    response_model=RequeueResponse,
    dependencies=[WriteAccess],
    responses=error_responses({422: "neither ids nor all", 503: "not ready"}),
)
async def requeue(body: RequeueRequest, state: ReadyState) -> RequeueResponse:
    """Put dead letters back on the queue as one new job (follow it at ``/jobs/{job_id}``)."""
    from service.deadletters import requeue_dead_letters

    result = await state.run(requeue_dead_letters, state.queue, state.jobs, body.ids)
    return RequeueResponse(
        job_id=result.job_id,
        requeued=result.requeued,
        skipped=result.skipped,
        not_found=result.not_found,
    )


def _make_tar(state: Any) -> tuple[Path, Path]:
    """Blocking: snapshot into a staging dir under the data dir, tar it; (tar, staging)."""
    from service.snapshots import create_snapshot

    root = Path(state.settings.data_dir) / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{uuid.uuid4().hex[:8]}-", dir=root))
    try:
        create_snapshot(state, staging / "snapshot")
        tar_path = staging / "snapshot.tar"
        with tarfile.open(tar_path, "w") as tar:
            for p in sorted((staging / "snapshot").rglob("*")):
                tar.add(p, arcname=str(p.relative_to(staging / "snapshot")), recursive=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return tar_path, staging


@router.post(
    "/snapshots",
    response_class=FileResponse,
    dependencies=[WriteAccess],
    responses={
        200: {"content": {"application/x-tar": {}}, "description": "the snapshot as a tar"},
        **error_responses({503: "not ready"}),
    },
)
async def create_snapshot(state: ReadyState) -> FileResponse:
    """A consistent snapshot of galleries, WAL and querybank, as a tar download."""
    t0 = time.perf_counter()
    tar_path, staging = await state.run(_make_tar, state)
    logger.info(
        "snapshot tar of %d bytes in %.2fs",
        tar_path.stat().st_size,
        time.perf_counter() - t0,
    )
    return FileResponse(
        tar_path,
        media_type="application/x-tar",
        filename=f"xmodal-snapshot-{int(time.time())}.tar",
        background=BackgroundTask(shutil.rmtree, staging, True),
    )
