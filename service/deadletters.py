"""Re-queue dead letters: put parked items back on the ingest queue under a new job.

A dead letter keeps its item without the media bytes. Items that carry their content (text,
a ``path`` under the media root) or whose spilled payload is still stored (Redis blob keys
live ``blob_ttl_s``; the embedded queue keeps a dead letter's payload until the dead letter is
deleted) are re-queued; the others are reported as not re-queueable.
The new messages are enqueued before the dead letters are deleted: a crash in between leaves
a duplicate, which ingestion's content-hash check makes a no-op.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

MAX_SCAN = 100_000  # dead letters looked at per requeue call


@dataclass
class RequeueResult:
    job_id: str | None
    requeued: list[str] = field(default_factory=list)  # message ids
    skipped: dict[str, str] = field(default_factory=dict)  # message id -> why
    not_found: list[str] = field(default_factory=list)


def requeue_dead_letters(queue: Any, jobs: Any, message_ids: Sequence[str] | None) -> RequeueResult:
    """Re-queue the dead letters with these message ids (all when None) as one new job."""
    letters = queue.list_dead_letters(count=MAX_SCAN)
    wanted = None if message_ids is None else set(message_ids)
    chosen = [d for d in letters if wanted is None or d.message_id in wanted]
    result = RequeueResult(job_id=None)
    if wanted is not None:
        result.not_found = sorted(wanted - {d.message_id for d in chosen})
    payloads: list[dict[str, Any]] = []
    taken: list[str] = []
    for d in chosen:
        item = {k: v for k, v in d.item.items() if k not in ("blob", "content", "blob_missing")}
        blob = d.item.get("blob")
        if blob:
            data = queue.load_blob(str(blob))
            if data is None:
                result.skipped[d.message_id] = "its payload expired; ingest the item again"
                continue
            item["data"] = data
        elif not any(item.get(k) is not None for k in ("text", "path", "data")):
            result.skipped[d.message_id] = (
                "its media bytes were not kept with the dead letter; ingest the file again"
            )
            continue
        payloads.append(item)
        taken.append(d.message_id)
    if payloads:
        job_id = uuid.uuid4().hex
        jobs.create(job_id, [str(p.get("id")) for p in payloads])
        queue.enqueue(job_id, payloads)
        queue.delete_dead_letters(taken)
        result.job_id = job_id
        result.requeued = taken
        logger.info("requeued %d dead letters as job %s", len(taken), job_id)
    return result


__all__ = ["RequeueResult", "requeue_dead_letters"]
