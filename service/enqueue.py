"""Accept an ingest job all or nothing: its job record and every item's queue message.

``POST /ingest`` answers 202 only once both exist. In Redis mode they are written in one
``MULTI``/``EXEC`` (the job hash and the stream entries live on the same server), so a Redis
outage at any moment leaves either the whole job queued or nothing: no job stuck ``queued``
with no messages, no messages of a job nobody can read. Embedded mode keeps them in two SQLite
files: the job is created first and, if queueing fails, its items are marked ``failed`` (never
left ``queued`` forever) before the error answers 503/500.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from service.jobs import ItemUpdate, JobStore, RedisJobStore
from service.queue import IngestQueue, RedisStreamQueue

logger = logging.getLogger(__name__)


def _same_server(a: Any, b: Any) -> bool:
    try:
        ka = a.connection_pool.connection_kwargs
        kb = b.connection_pool.connection_kwargs
    except AttributeError:
        return False
    keys = ("host", "port", "db", "path", "username")
    return all(ka.get(k) == kb.get(k) for k in keys)


def enqueue_job(
    jobs: JobStore, queue: IngestQueue, job_id: str, payloads: Sequence[dict[str, Any]]
) -> None:
    """Register ``job_id`` with its items and queue them, atomically where the stores allow."""
    item_ids = [str(p["id"]) for p in payloads]
    if (
        isinstance(jobs, RedisJobStore)
        and isinstance(queue, RedisStreamQueue)
        and _same_server(jobs.redis, queue.redis)
    ):
        pipe = queue.redis.pipeline(transaction=True)
        jobs.create_into(pipe, job_id, item_ids)
        queue.enqueue_into(pipe, job_id, payloads)
        pipe.execute()
        return
    jobs.create(job_id, item_ids)
    try:
        queue.enqueue(job_id, payloads)
    except BaseException:
        try:
            jobs.set_states(
                ItemUpdate(job_id, i, "failed", "not queued: the queue failed") for i in item_ids
            )
        except Exception:  # noqa: BLE001 - the original error is the one to answer
            logger.warning("could not mark the items of unqueued job %s failed", job_id)
        raise


__all__ = ["enqueue_job"]
