"""The one place that chooses embedded or Redis mode: :func:`open_backends`.

Embedded (no ``XMODAL_REDIS_URL``): SQLite queue and job store under ``data_dir``, the file
querybank store, vectors written straight into the galleries (:class:`~service.sinks.GallerySink`).
Redis: Redis Streams queue, Redis job store and querybank, vectors published on the replication
log (``ReplicationPublisher``) that every API replica applies. The API
(:mod:`service.lifecycle`), the embedded worker, ``xmodal worker`` and ``xmodal querybank`` all
open their stores here. Imports only lower modules.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from service.settings import Settings

if TYPE_CHECKING:
    from index.gallery import Gallery
    from index.querybank import QueryBankStore
    from service.jobs import JobStore
    from service.queue import IngestQueue
    from service.sinks import VectorSink

logger = logging.getLogger(__name__)

Mode = Literal["embedded", "redis"]
BACKEND_PARTS = ("queue", "jobs", "querybank", "sink")


def backend_mode(settings: Settings) -> Mode:
    """Redis mode when ``XMODAL_REDIS_URL`` is set, else embedded."""
    return "embedded" if settings.embedded else "redis"


@dataclass
class Backends:
    """The shared stores of one mode; a part not asked for (or not available) is None."""

    mode: Mode
    queue: IngestQueue | None = None
    jobs: JobStore | None = None
    querybank: QueryBankStore | None = None
    # Redis: the replication-log publisher (the workers' sink; the API's deletes).
    # Embedded: a GallerySink over the galleries passed in, else None.
    sink: VectorSink | None = None

    def close(self) -> None:
        for name in BACKEND_PARTS:
            close_quietly(name, getattr(self, name))


def close_quietly(name: str, obj: Any) -> None:
    """``obj.close()`` when it has one; a failure is logged, not raised (shutdown goes on)."""
    close = getattr(obj, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            logger.exception("closing the %s failed", name)


def open_backends(
    settings: Settings,
    galleries: Mapping[str, Gallery] | None = None,
    parts: Collection[str] = BACKEND_PARTS,
) -> Backends:
    """Queue, job store, querybank store and vector sink for ``settings``' mode.

    ``parts`` limits what is opened (``xmodal querybank`` needs only the querybank store).
    In embedded mode the sink writes into ``galleries`` (None without them).
    """
    unknown = set(parts) - set(BACKEND_PARTS)
    if unknown:
        raise ValueError(f"unknown backend parts {sorted(unknown)}")
    mode = backend_mode(settings)
    out = Backends(mode=mode)
    q = settings.queue
    data_dir = Path(settings.data_dir)
    if mode == "redis":
        from index.querybank import RedisQueryBankStore
        from service.jobs import RedisJobStore
        from service.queue import RedisStreamQueue
        from service.replication import ReplicationPublisher

        url = settings.redis_url
        assert url is not None
        if "queue" in parts:
            out.queue = RedisStreamQueue(  # fails fast when Redis is unreachable
                url,
                maxlen=q.stream_maxlen,
                dead_maxlen=q.dead_maxlen,
                spill_bytes=q.spill_bytes,
                blob_ttl_s=q.blob_ttl_s,
            )
        if "jobs" in parts:
            out.jobs = RedisJobStore(url, ttl_s=q.job_ttl_s)
        if "querybank" in parts:
            out.querybank = RedisQueryBankStore(url)
        if "sink" in parts:
            out.sink = ReplicationPublisher(url)
        return out
    from index.querybank import FileQueryBankStore
    from service.jobs import LocalJobStore
    from service.queue import LocalQueue
    from service.sinks import GallerySink

    if "queue" in parts:
        out.queue = LocalQueue(data_dir / "queue.sqlite3", spill_bytes=q.spill_bytes)
    if "jobs" in parts:
        out.jobs = LocalJobStore(data_dir / "jobs.sqlite3", ttl_s=q.job_ttl_s)
    if "querybank" in parts:
        out.querybank = FileQueryBankStore(data_dir / "querybank")
    if "sink" in parts and galleries is not None:
        out.sink = GallerySink(galleries)
    return out


__all__ = ["BACKEND_PARTS", "Backends", "Mode", "backend_mode", "open_backends"]
