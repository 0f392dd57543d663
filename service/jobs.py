"""Ingestion job state: per-item states, readable by ``GET /jobs/{job_id}``.

An item moves ``queued -> encoding -> indexed | failed``. ``indexed`` and ``failed`` are
terminal and sticky: a redelivered message (at-least-once delivery) cannot move an item back
to ``encoding``; it may only record another terminal state. The job's state is derived on
read: ``queued`` while no item has started, ``running`` while some item is not terminal,
``done`` once every item is indexed or failed, ``failed`` when every item failed.

Redis: one hash per job (``xmodal:job:<id>``: ``_items`` = JSON list of ids in order, ``s:<id>``
= state, ``e:<id>`` = error), with a TTL refreshed on each update. Embedded: SQLite beside the
queue; jobs older than the TTL are pruned when new jobs are created.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from service.kinds import ITEM_STATES, TERMINAL_STATES, JobState
from service.schemas import JobItem, JobResponse
from service.settings import QueueSettings
from service.sqlite import immediate

TERMINAL: frozenset[str] = TERMINAL_STATES
DEFAULT_JOB_TTL_S = QueueSettings().job_ttl_s  # the number lives in settings

JobStatus = JobResponse  # the stores answer with the API's type (service.schemas)


class ItemUpdate(NamedTuple):
    """One state change, for :meth:`JobStore.set_states`."""

    job_id: str
    item_id: str
    state: str
    error: str | None = None


def job_state(states: Sequence[str]) -> JobState:
    """Derive the job state from its items' states."""
    if not states or all(s == "failed" for s in states):
        return "failed" if states else "done"
    if all(s in TERMINAL for s in states):
        return "done"
    if all(s == "queued" for s in states):
        return "queued"
    return "running"


def _check_state(state: str) -> None:
    if state not in ITEM_STATES:
        raise ValueError(f"unknown item state {state!r}; expected one of {ITEM_STATES}")


@runtime_checkable
class JobStore(Protocol):
    """Job state shared by the API (create, get) and the workers (set_state)."""

    def create(self, job_id: str, item_ids: Sequence[str]) -> None:
        """Register a job with its items, all ``queued`` (before the items are enqueued)."""
        ...

    def set_state(self, job_id: str, item_id: str, state: str, error: str | None = None) -> None:
        """Move one item; unknown jobs/items are ignored, terminal states are sticky."""
        ...

    def set_states(self, updates: Iterable[ItemUpdate]) -> None:
        """Several updates at once (one round trip / transaction)."""
        ...

    def get(self, job_id: str) -> JobStatus | None:
        """The job's status, or None when unknown or expired."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------ Redis

# Atomic sticky update: ARGV = item_id, state, error ("" for none), ttl.
_SET_STATE_LUA = """
local cur = redis.call('HGET', KEYS[1], 's:' .. ARGV[1])
if not cur then return 0 end
if (cur == 'indexed' or cur == 'failed') and ARGV[2] ~= 'indexed' and ARGV[2] ~= 'failed' then
  return 0
end
redis.call('HSET', KEYS[1], 's:' .. ARGV[1], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'e:' .. ARGV[1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""


class _JobStoreBase:
    """What both job stores share: validation and the single-item form of ``set_states``."""

    def set_state(self, job_id: str, item_id: str, state: str, error: str | None = None) -> None:
        self.set_states([ItemUpdate(job_id, item_id, state, error)])

    def set_states(self, updates: Iterable[ItemUpdate]) -> None:
        updates = list(updates)
        for u in updates:
            _check_state(u.state)
        if updates:
            self._write_states(updates)

    def _write_states(self, updates: list[ItemUpdate]) -> None:
        raise NotImplementedError


class RedisJobStore(_JobStoreBase):
    """Jobs as Redis hashes with a TTL."""

    def __init__(
        self,
        url: str,
        prefix: str = "xmodal:job:",
        ttl_s: int = DEFAULT_JOB_TTL_S,
        client: Any = None,
    ) -> None:
        import redis

        self.redis: Any = client if client is not None else redis.Redis.from_url(url)
        self.prefix, self.ttl_s = prefix, ttl_s
        self._set_state = self.redis.register_script(_SET_STATE_LUA)

    def create(self, job_id: str, item_ids: Sequence[str]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        self.create_into(pipe, job_id, item_ids)
        pipe.execute()

    def create_into(self, pipe: Any, job_id: str, item_ids: Sequence[str]) -> None:
        """Queue the commands of :meth:`create` on ``pipe`` (a MULTI pipeline)."""
        key = self.prefix + job_id
        mapping: dict[str, str] = {"_items": json.dumps(list(item_ids)), "_at": str(time.time())}
        mapping.update({f"s:{i}": "queued" for i in item_ids})
        pipe.delete(key)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, self.ttl_s)
        pipe.zadd(self.recent_key, {job_id: time.time()})

    @property
    def recent_key(self) -> str:
        """Sorted set of job ids by creation time (for ``GET /jobs``)."""
        return self.prefix.rstrip(":") + "s:recent"

    def recent(self, limit: int = 20) -> list[tuple[str, float]]:
        """``(job_id, created_at)`` of the newest jobs, newest first (expired ones pruned)."""
        self.redis.zremrangebyscore(self.recent_key, "-inf", time.time() - self.ttl_s)
        rows = self.redis.zrevrange(self.recent_key, 0, max(0, limit - 1), withscores=True)
        return [(k.decode() if isinstance(k, bytes) else str(k), float(t)) for k, t in rows]

    def _write_states(self, updates: list[ItemUpdate]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for u in updates:
            self._set_state(
                keys=[self.prefix + u.job_id],
                args=[u.item_id, u.state, (u.error or "")[:2000], self.ttl_s],
                client=pipe,
            )
        pipe.execute()

    def get(self, job_id: str) -> JobStatus | None:
        raw = self.redis.hgetall(self.prefix + job_id)
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return _status(job_id, json.loads(fields["_items"]), fields)

    def close(self) -> None:
        self.redis.close()


def _status(job_id: str, item_ids: list[str], fields: dict[str, str]) -> JobStatus:
    items = [
        JobItem(id=i, state=fields.get(f"s:{i}", "queued"), error=fields.get(f"e:{i}"))  # type: ignore[arg-type]
        for i in item_ids
    ]
    return JobStatus(job_id=job_id, state=job_state([it.state for it in items]), items=items)


# ----------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    item_id TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    PRIMARY KEY (job_id, item_id)
);
CREATE INDEX IF NOT EXISTS job_items_order ON job_items (job_id, idx);
"""


class LocalJobStore(_JobStoreBase):
    """Jobs in SQLite (embedded mode); thread-safe."""

    def __init__(self, path: str | Path, ttl_s: int = DEFAULT_JOB_TTL_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # job state is advisory, not the data
        self._db.executescript(_SCHEMA)

    def create(self, job_id: str, item_ids: Sequence[str]) -> None:
        now = time.time()
        with self._lock, immediate(self._db) as cur:
            expired = now - self.ttl_s
            cur.execute(
                "DELETE FROM job_items WHERE job_id IN "
                "(SELECT job_id FROM jobs WHERE created_at < ?)",
                (expired,),
            )
            cur.execute("DELETE FROM jobs WHERE created_at < ?", (expired,))
            cur.execute("DELETE FROM job_items WHERE job_id = ?", (job_id,))
            cur.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (job_id, now))
            cur.executemany(
                "INSERT OR REPLACE INTO job_items VALUES (?, ?, ?, 'queued', NULL)",
                [(job_id, i, item_id) for i, item_id in enumerate(item_ids)],
            )

    def _write_states(self, updates: list[ItemUpdate]) -> None:
        sticky = "('indexed', 'failed')"
        with self._lock, immediate(self._db) as cur:
            cur.executemany(
                "UPDATE job_items SET state = ?, error = ? WHERE job_id = ? AND item_id = ? "
                f"AND (state NOT IN {sticky} OR ? IN {sticky})",
                [
                    (
                        u.state,
                        (u.error or None) and u.error[:2000],
                        u.job_id,
                        u.item_id,
                        u.state,
                    )
                    for u in updates
                ],
            )

    def get(self, job_id: str) -> JobStatus | None:
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, state, error FROM job_items WHERE job_id = ? ORDER BY idx",
                (job_id,),
            ).fetchall()
            known = (
                rows
                or self._db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            )
        if not known:
            return None
        items = [JobItem(id=r[0], state=r[1], error=r[2]) for r in rows]
        return JobStatus(job_id=job_id, state=job_state([it.state for it in items]), items=items)

    def recent(self, limit: int = 20) -> list[tuple[str, float]]:
        """``(job_id, created_at)`` of the newest jobs, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, created_at FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
