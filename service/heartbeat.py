"""Worker heartbeats in Redis: which ingest workers are alive right now.

Every ``xmodal worker`` runs a :class:`Heartbeat` thread. Every ``worker.heartbeat_interval_s``
it writes, in one MULTI/EXEC,

- the key ``<stream>:worker:<consumer>`` (JSON: consumer, host, pid, device, model, start
  time, last beat, batches and items done, last batch time) with a TTL of
  ``worker.heartbeat_ttl_s``, and
- the consumer's name into the set ``<stream>:workers`` (the index readers enumerate).

``<stream>`` is the ingest stream the worker consumes (``xmodal:ingest``), so workers of another
queue never count. A worker that stops cleanly deletes its key; one that crashes or is killed
disappears when its TTL runs out. :func:`live_workers` reads the set and the keys and drops the
members whose key expired (atomically, in a Lua script).

The API reads them: ``/readyz`` lists the live workers, ``/metrics`` exports
``xmodal_workers_live``, and ``GET /jobs/{id}`` says so when a job waits with no live worker
(instead of sitting at ``queued`` silently, e.g. ``XMODAL_REDIS_URL=... xmodal serve`` started
without any ``xmodal worker``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from pydantic import BaseModel

logger = logging.getLogger(__name__)

DEFAULT_STREAM = "xmodal:ingest"

# KEYS[1] = the set of worker names; ARGV[1] = the key prefix of the workers' beats.
_LIVE_LUA = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local beat = redis.call('GET', ARGV[1] .. name)
  if beat then
    table.insert(out, beat)
  else
    redis.call('SREM', KEYS[1], name)
  end
end
return out
"""


class WorkerBeat(BaseModel):
    """What one worker last reported."""

    consumer: str
    host: str = ""
    pid: int = 0
    device: str = ""
    model: str = ""
    started_at: float = 0.0  # unix seconds
    beat_at: float = 0.0  # unix seconds of this beat
    batches: int = 0  # batches with at least one message, since start
    items: int = 0  # messages read, since start
    last_batch_at: float | None = None  # unix seconds


def workers_key(stream: str = DEFAULT_STREAM) -> str:
    """The set of worker names consuming ``stream``."""
    return f"{stream}:workers"


def beat_prefix(stream: str = DEFAULT_STREAM) -> str:
    """Prefix of the per-worker heartbeat keys of ``stream``."""
    return f"{stream}:worker:"


class Heartbeat:
    """A background thread that keeps one worker's heartbeat key alive (module docstring).

    Args:
        client: a ``redis.Redis``.
        consumer: the worker's consumer name (unique per running worker).
        stream: the ingest stream it consumes.
        interval_s: seconds between beats.
        ttl_s: lifetime of a beat; must exceed ``interval_s`` (3x is a good margin).
        info: static fields of :class:`WorkerBeat` (device, model, ...).
    """

    def __init__(
        self,
        client: Any,
        consumer: str,
        *,
        stream: str = DEFAULT_STREAM,
        interval_s: float = 5.0,
        ttl_s: float = 15.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        if interval_s <= 0 or ttl_s <= interval_s:
            raise ValueError(
                f"heartbeat ttl ({ttl_s} s) must exceed its interval ({interval_s} s) > 0"
            )
        self.redis = client
        self.stream = stream
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.key = beat_prefix(stream) + consumer
        self.beat_info = WorkerBeat(
            consumer=consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
            **(info or {}),
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_batch(self, report: Any) -> None:
        """Count a processed batch (a ``Worker.on_batch`` callback: ``report.read`` items)."""
        read = int(getattr(report, "read", 0))
        if read:
            with self._lock:
                self.beat_info.batches += 1
                self.beat_info.items += read
                self.beat_info.last_batch_at = time.time()

    def beat(self) -> None:
        """Write the heartbeat once (raises when Redis is unreachable)."""
        with self._lock:
            self.beat_info.beat_at = time.time()
            payload = self.beat_info.model_dump_json()
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.key, payload, px=max(1, int(self.ttl_s * 1000)))
        pipe.sadd(workers_key(self.stream), self.beat_info.consumer)
        pipe.execute()

    def run(self) -> None:
        """Beat every ``interval_s`` until :meth:`stop`; a failed beat is logged and retried."""
        failing = False
        while not self._stop.is_set():
            try:
                self.beat()
                if failing:
                    logger.info("heartbeat %s: Redis reachable again", self.key)
                failing = False
            except Exception as exc:  # noqa: BLE001 - keep beating once Redis is back
                if not failing:
                    logger.warning("heartbeat %s failed: %r", self.key, exc)
                failing = True
            self._stop.wait(self.interval_s)

    def start(self) -> Heartbeat:
        """Beat once now (so the worker is visible before its first batch), then in a thread."""
        try:
            self.beat()
        except Exception as exc:  # noqa: BLE001 - the thread retries
            logger.warning("heartbeat %s: first beat failed: %r", self.key, exc)
        self._thread = threading.Thread(target=self.run, name="xmodal-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop beating and remove this worker's key (it is no longer live)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.key)
            pipe.srem(workers_key(self.stream), self.beat_info.consumer)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the TTL removes it anyway
            logger.warning("heartbeat %s: could not remove the key: %r", self.key, exc)


def live_workers(client: Any, stream: str = DEFAULT_STREAM) -> list[WorkerBeat]:
    """The workers of ``stream`` whose heartbeat has not expired, by consumer name."""
    rows = client.eval(_LIVE_LUA, 1, workers_key(stream), beat_prefix(stream))
    beats = []
    for raw in rows or []:
        try:
            beats.append(WorkerBeat.model_validate(json.loads(raw)))
        except ValueError:
            logger.warning("ignoring a malformed worker heartbeat: %r", raw[:200])
    return sorted(beats, key=lambda b: b.consumer)


def start_worker_heartbeat(settings: Any, worker: Any) -> Heartbeat:
    """Start the heartbeat of a Redis-mode ``Worker`` (``xmodal worker``), counting its
    batches through ``worker.on_batch`` (chained with any callback already set)."""
    queue = worker.queue
    model = worker.model
    heartbeat = Heartbeat(
        queue.redis,
        worker.consumer,
        stream=getattr(queue, "stream", DEFAULT_STREAM),
        interval_s=settings.worker.heartbeat_interval_s,
        ttl_s=settings.worker.heartbeat_ttl_s,
        info={
            "device": str(getattr(model, "device", "cpu")),
            "model": str(getattr(model, "name", "")),
        },
    )
    previous = worker.on_batch

    def on_batch(report: Any) -> None:
        heartbeat.on_batch(report)
        if previous is not None:
            previous(report)

    worker.on_batch = on_batch
    return heartbeat.start()


def waiting_hint(states: list[str], live: int) -> str | None:
    """What ``GET /jobs/{id}`` says about a job whose items wait with ``live`` workers.

    None when nothing waits or a worker is live; otherwise a sentence telling the user that
    nothing will process the job until a worker starts.
    """
    waiting = sum(1 for s in states if s in ("queued", "encoding"))
    if not waiting or live > 0:
        return None
    return (
        f"no live ingest worker: {waiting} item(s) wait in the queue and will not be indexed "
        "until one runs; start `xmodal worker` with the same XMODAL_REDIS_URL"
    )


__all__ = [
    "Heartbeat",
    "WorkerBeat",
    "beat_prefix",
    "live_workers",
    "start_worker_heartbeat",
    "waiting_hint",
    "workers_key",
]
