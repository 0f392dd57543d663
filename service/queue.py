"""The durable ingestion queue: Redis Streams (distributed) or SQLite (embedded).

One message per item, so a batch from ``POST /ingest`` spreads over workers, dynamic batches
mix jobs, and one bad item never holds back its batch-mates. Both implementations give the
same at-least-once semantics:

- ``enqueue`` returns once every item of the job is stored (Redis: one MULTI/EXEC; SQLite: one
  transaction with ``synchronous=FULL``);
- ``read`` hands new messages to one consumer; they stay *pending* until ``ack``;
- ``reclaim`` moves messages pending longer than ``min_idle_ms`` (a crashed or stuck worker's)
  to another consumer, counting deliveries (Redis: ``XAUTOCLAIM``);
- ``nack`` records why a delivery failed (the message stays pending and is retried after the
  claim timeout), and ``dead_letter`` parks a message that keeps failing, with its error, in a
  dead-letter stream/table and removes it from the queue.
- ``recover`` hands a restarted consumer what it held when it died, at once;
  ``reclaim_dead`` lets live workers take a dead peer's pending work in seconds (Redis: a
  peer whose heartbeat record ``<stream>:worker:<consumer>`` of :mod:`service.heartbeat`
  expired is dead; embedded: one process owns the file, so ``recover`` is enough);
  ``mark_solo`` counts a message's tries alone, durably, so the worker can pin a crash on
  the item that causes it (``<stream>:solo`` hash / ``solo`` column).

Large payloads (the spill choice). Base64 media is not kept inside stream entries: an item
whose ``data`` is bytes, or a base64 string longer than ``spill_bytes``, is decoded once at
enqueue (or handed over decoded as ``item["content"]`` by the API, which decoded it to
validate it) and its raw bytes stored beside the queue — a Redis key ``<stream>:blob:<uuid>``
with a TTL (``blob_ttl_s``, default 7 days, so an abandoned blob cannot live forever) in Redis
mode, a row of the ``blobs`` table in embedded mode. The entry carries ``{"blob": key}``
instead. ``read`` resolves the reference and hands the worker the raw bytes as
``item["content"]`` (``item["blob_missing"] = True`` if it expired); ``ack`` deletes the blob.
Dead-lettered blobs are kept until their TTL so the item can be inspected or re-queued.
Redis streams stay small (an entry is ~200 bytes), and acked entries are ``XDEL``-ed, so
``XLEN`` is exactly the backlog; ``XADD MAXLEN ~`` is only a safety cap.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from service.heartbeat import beat_prefix
from service.media import MediaError, decode_base64
from service.settings import QueueSettings
from service.sqlite import immediate

logger = logging.getLogger(__name__)

_DEFAULTS = QueueSettings()  # the numbers live in settings (XMODAL_QUEUE__*)
DEFAULT_SPILL_BYTES = _DEFAULTS.spill_bytes  # base64 strings longer go to the blob store
DEFAULT_BLOB_TTL_S = _DEFAULTS.blob_ttl_s
DEFAULT_MAXLEN = _DEFAULTS.stream_maxlen  # safety cap on the stream; acked entries are deleted
DEFAULT_DEAD_MAXLEN = _DEFAULTS.dead_maxlen


@dataclass
class Message:
    """One queued item: ``item`` is the ingest item dict (``content`` bytes when spilled)."""

    id: str
    job_id: str
    item: dict[str, Any]
    deliveries: int = 1  # how many times it has been handed to a consumer, this one included
    last_error: str | None = None  # the error a previous delivery recorded with nack()
    enqueued_at: float = 0.0
    solo: int = 0  # deliveries in a batch of its own (see mark_solo); 0 = not yet tried alone


@dataclass
class DeadLetter:
    """A message parked after repeated failures."""

    message_id: str
    job_id: str
    item: dict[str, Any]
    error: str
    deliveries: int
    at: float = field(default_factory=time.time)


@runtime_checkable
class IngestQueue(Protocol):
    """What the API (enqueue, gauges) and the worker (the rest) rely on."""

    def enqueue(self, job_id: str, items: Sequence[dict[str, Any]]) -> list[str]:
        """Store one message per item; durable on return. Returns the message ids."""
        ...

    def read(self, consumer: str, count: int, block_ms: int = 0) -> list[Message]:
        """Up to ``count`` new messages for ``consumer``, waiting up to ``block_ms``."""
        ...

    def ack(self, message_ids: Iterable[str]) -> None:
        """Done with these messages (their vectors are durable, or they failed for good)."""
        ...

    def nack(self, message: Message, error: str) -> None:
        """Record a failed delivery; the message stays pending and is retried after reclaim."""
        ...

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        """Take over messages pending longer than ``min_idle_ms`` (deliveries incremented)."""
        ...

    def dead_letter(self, message: Message, error: str) -> None:
        """Park ``message`` in the dead-letter store with ``error`` and remove it."""
        ...

    def recover(self, consumer: str, count: int) -> list[Message]:
        """At start-up: the messages ``consumer`` held when its process died, handed back at
        once (deliveries incremented). Embedded: every message delivered before this queue
        was opened (the process owns its queue). Redis: the consumer's own pending entries
        (``XREADGROUP`` from id 0), a batch per call; ``[]`` once there are none left."""
        ...

    def mark_solo(self, message: Message) -> int:
        """Durably count one more delivery of ``message`` alone (before processing it, so a
        crash counts); returns the count, also stored on ``message.solo``."""
        ...

    def reclaim_dead(self, consumer: str, count: int) -> list[Message]:
        """Take over pending messages of consumers whose heartbeat expired (a crashed peer's
        work comes back in seconds, not after ``claim_idle_ms``); embedded: ``[]``."""
        ...

    def depth(self) -> int:
        """Messages waiting for a first delivery."""
        ...

    def pending(self) -> int:
        """Messages delivered but not yet acked."""
        ...

    def dead_letters(self) -> int:
        """Number of dead-lettered messages."""
        ...

    def list_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest last."""
        ...

    def stats(self) -> dict[str, int]:
        """``{"depth", "pending", "dead_letters"}`` for metrics and /readyz."""
        ...

    def close(self) -> None: ...


def _prepare(item: dict[str, Any], spill_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    """Split an item into its queue entry and the raw bytes to spill (or None).

    A caller that already decoded a base64 ``data`` (``POST /ingest`` does, to validate it)
    may hand the bytes over as ``content``; they are spilled as they are, not decoded again.
    """
    entry = {k: v for k, v in item.items() if k not in ("content", "blob", "blob_missing")}
    data = entry.get("data")
    if isinstance(data, (bytes, bytearray, memoryview)):
        entry.pop("data")
        return entry, bytes(data)
    if isinstance(data, str) and len(data) > spill_bytes:
        entry.pop("data")
        decoded = item.get("content")
        if isinstance(decoded, (bytes, bytearray, memoryview)):
            return entry, bytes(decoded)
        # Already validated by the API; a bad string here is a caller bug, surfaced as 400.
        return entry, decode_base64(data)
    return entry, None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ----------------------------------------------------------------------------------- Redis


def _log_dead_letter(message: Message, error: str) -> None:
    """The one warning both queues log when a message goes to the dead letters."""
    logger.warning(
        "dead-lettered %s (job %s, item %s) after %d deliveries: %s",
        message.id,
        message.job_id,
        message.item.get("id"),
        message.deliveries,
        error,
    )


class RedisStreamQueue:
    """Redis Streams queue: one stream, one consumer group, a dead-letter stream, blob keys.

    Keys: ``<stream>`` (entries ``{job, item}``), ``<stream>:dead``, ``<stream>:errors`` (hash of
    last errors by message id), ``<stream>:blob:<uuid>`` (spilled payloads, with TTL).
    """

    def __init__(
        self,
        url: str,
        stream: str = "xmodal:ingest",
        group: str = "workers",
        *,
        maxlen: int = DEFAULT_MAXLEN,
        dead_maxlen: int = DEFAULT_DEAD_MAXLEN,
        spill_bytes: int = DEFAULT_SPILL_BYTES,
        blob_ttl_s: int = DEFAULT_BLOB_TTL_S,
        client: Any = None,
    ) -> None:
        import redis

        self.redis: Any = client if client is not None else redis.Redis.from_url(url)
        self.stream, self.group = stream, group
        self.dead_stream = f"{stream}:dead"
        self.errors_key = f"{stream}:errors"
        self.blob_prefix = f"{stream}:blob:"
        self.solo_key = f"{stream}:solo"  # hash: message id -> deliveries alone
        self.alive_prefix = beat_prefix(stream)  # the workers' heartbeats (service.heartbeat)
        self._recover_from: dict[str, str] = {}  # consumer -> last id recover() handed out
        self.maxlen, self.dead_maxlen = maxlen, dead_maxlen
        self.spill_bytes, self.blob_ttl_s = spill_bytes, blob_ttl_s
        self.ensure_group()

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) if missing; BUSYGROUP is fine."""
        import redis

        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, job_id: str, items: Sequence[dict[str, Any]]) -> list[str]:
        pipe = self.redis.pipeline(transaction=True)
        self.enqueue_into(pipe, job_id, items)
        results = pipe.execute()
        return [r.decode() for r in results if isinstance(r, bytes)]

    def enqueue_into(self, pipe: Any, job_id: str, items: Sequence[dict[str, Any]]) -> None:
        """Queue the commands of :meth:`enqueue` on ``pipe`` (a MULTI pipeline the caller
        executes, with the job's creation: see :func:`service.enqueue.enqueue_job`)."""
        for item in items:
            entry, blob = _prepare(item, self.spill_bytes)
            if blob is not None:
                key = f"{self.blob_prefix}{uuid.uuid4().hex}"
                pipe.set(key, blob, ex=self.blob_ttl_s)
                entry["blob"] = key
            fields = {"job": job_id, "item": _dumps(entry), "at": f"{time.time():.3f}"}
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)

    def read(self, consumer: str, count: int, block_ms: int = 0) -> list[Message]:
        import redis

        try:
            reply = self.redis.xreadgroup(
                self.group,
                consumer,
                {self.stream: ">"},
                count=count,
                block=block_ms if block_ms > 0 else None,  # BLOCK 0 would wait forever
            )
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()  # the stream was deleted (FLUSHDB): recreate and retry later
            return []
        entries = [e for _, batch in (reply or []) for e in batch]
        return self._messages(entries, {})

    def ack(self, message_ids: Iterable[str]) -> None:
        ids = list(message_ids)
        if not ids:
            return
        # Blob keys must be read before the entries go.
        blobs = self._blob_keys(ids)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.hdel(self.errors_key, *ids)
        pipe.hdel(self.solo_key, *ids)
        if blobs:
            pipe.delete(*blobs)
        pipe.execute()

    def nack(self, message: Message, error: str) -> None:
        self.redis.hset(self.errors_key, message.id, error[:2000])

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        reply = self.redis.xautoclaim(
            self.stream,
            self.group,
            consumer,
            min_idle_time=min_idle_ms,
            start_id="0-0",
            count=count,
        )
        # [next_start, [(id, fields)...], [deleted ids...]] (Redis >= 7 adds the third part)
        claimed = [e for e in reply[1] if e[1]]
        deleted = reply[2] if len(reply) > 2 else []
        if deleted:  # entries trimmed while pending: nothing left to process
            self.redis.xack(self.stream, self.group, *deleted)
        return self._with_counts(claimed)

    def _with_counts(self, claimed: list[Any]) -> list[Message]:
        """Messages of claimed ``(id, fields)`` entries, with their delivery counts."""
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for mid, _ in claimed:
            pipe.xpending_range(self.stream, self.group, min=mid, max=mid, count=1)
        counts = {}
        for mid_fields, pending in zip(claimed, pipe.execute(), strict=True):
            counts[mid_fields[0]] = pending[0]["times_delivered"] if pending else 1
        return self._messages(claimed, counts)

    def recover(self, consumer: str, count: int) -> list[Message]:
        start = self._recover_from.get(consumer, "0-0")
        reply = self.redis.xreadgroup(self.group, consumer, {self.stream: start}, count=count)
        entries = [e for _, batch in (reply or []) for e in batch]
        if not entries:
            return []
        last = entries[-1][0]
        self._recover_from[consumer] = last.decode() if isinstance(last, bytes) else last
        gone = [mid for mid, f in entries if not f]  # deleted while pending: nothing to do
        if gone:
            self.redis.xack(self.stream, self.group, *gone)
        live = [e for e in entries if e[1]]
        messages = self._with_counts(live)
        if not messages and len(entries) == count:  # a page of deleted entries: keep going
            return self.recover(consumer, count)
        return messages

    def mark_solo(self, message: Message) -> int:
        message.solo = int(self.redis.hincrby(self.solo_key, message.id, 1))
        return message.solo

    def reclaim_dead(self, consumer: str, count: int, min_idle_ms: int = 1000) -> list[Message]:
        """Consumers with pending work and no heartbeat key are dead: ``XCLAIM`` their
        entries (idle at least ``min_idle_ms``, so two live workers never both take one), a
        full batch per call; consumers left with nothing pending are removed from the group."""
        try:
            consumers = self.redis.xinfo_consumers(self.stream, self.group)
        except Exception:  # noqa: BLE001 - no group yet
            return []
        others = [c for c in consumers if _text(c["name"]) != consumer]
        if not others:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for c in others:
            pipe.exists(self.alive_prefix + _text(c["name"]))
        alive = pipe.execute()
        claimed: list[Any] = []
        for c, is_alive in zip(others, alive, strict=True):
            name = _text(c["name"])
            if is_alive:
                continue
            if int(c["pending"]) == 0:
                if int(c["idle"]) > 60_000:  # long gone: tidy the group
                    self.redis.xgroup_delconsumer(self.stream, self.group, name)
                continue
            want = count - len(claimed)
            if want <= 0:
                break
            rows = self.redis.xpending_range(
                self.stream, self.group, min="-", max="+", count=want, consumername=name
            )
            ids = [r["message_id"] for r in rows]
            if not ids:
                continue
            got = self.redis.xclaim(
                self.stream, self.group, consumer, min_idle_time=min_idle_ms, message_ids=ids
            )
            gone = [mid for mid, f in got if not f]
            if gone:
                self.redis.xack(self.stream, self.group, *gone)
            claimed += [e for e in got if e[1]]
            if claimed:
                logger.warning(
                    "reclaimed %d messages of dead consumer %s", len(got) - len(gone), name
                )
        return self._with_counts(claimed)

    def dead_letter(self, message: Message, error: str) -> None:
        item = {k: v for k, v in message.item.items() if k not in ("content", "data")}
        fields = {
            "message_id": message.id,
            "job": message.job_id,
            "item": _dumps(item),
            "error": error[:2000],
            "deliveries": str(message.deliveries),
            "at": f"{time.time():.3f}",
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, fields, maxlen=self.dead_maxlen, approximate=True)
        pipe.xack(self.stream, self.group, message.id)
        pipe.xdel(self.stream, message.id)
        pipe.hdel(self.errors_key, message.id)
        pipe.hdel(self.solo_key, message.id)
        pipe.execute()
        _log_dead_letter(message, error)

    def depth(self) -> int:
        return max(0, int(self.redis.xlen(self.stream)) - self.pending())

    def pending(self) -> int:
        import redis

        try:
            return int(self.redis.xpending(self.stream, self.group)["pending"])
        except redis.exceptions.ResponseError:
            return 0

    def dead_letters(self) -> int:
        return int(self.redis.xlen(self.dead_stream))

    def list_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        out = []
        for _, f in reversed(self.redis.xrevrange(self.dead_stream, count=count)):
            d = {k.decode(): v.decode() for k, v in f.items()}
            out.append(
                DeadLetter(
                    message_id=d["message_id"],
                    job_id=d["job"],
                    item=json.loads(d["item"]),
                    error=d["error"],
                    deliveries=int(d["deliveries"]),
                    at=float(d["at"]),
                )
            )
        return out

    def delete_dead_letters(self, message_ids: Iterable[str]) -> int:
        """Drop the dead letters of these message ids (after a requeue); returns how many."""
        wanted = set(message_ids)
        doomed = [
            eid
            for eid, f in self.redis.xrange(self.dead_stream)
            if f.get(b"message_id", b"").decode() in wanted
        ]
        return int(self.redis.xdel(self.dead_stream, *doomed)) if doomed else 0

    def load_blob(self, key: str) -> bytes | None:
        """The spilled payload a dead letter refers to (None once its TTL expired)."""
        data = self.redis.get(key)
        return bytes(data) if data is not None else None

    def stats(self) -> dict[str, int]:
        return {
            "depth": self.depth(),
            "pending": self.pending(),
            "dead_letters": self.dead_letters(),
        }

    def close(self) -> None:
        self.redis.close()

    def _blob_keys(self, ids: list[str]) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for mid in ids:
            pipe.xrange(self.stream, min=mid, max=mid, count=1)
        keys = []
        for rows in pipe.execute():
            for _, f in rows:
                blob = json.loads(f[b"item"]).get("blob")
                if blob:
                    keys.append(blob)
        return keys

    def _messages(self, entries: list[Any], deliveries: dict[Any, int]) -> list[Message]:
        if not entries:
            return []
        ids = [mid.decode() if isinstance(mid, bytes) else mid for mid, _ in entries]
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.errors_key, ids)
        pipe.hmget(self.solo_key, ids)
        errors, solos = pipe.execute()
        messages = []
        for (raw_id, f), mid, err, solo in zip(entries, ids, errors, solos, strict=True):
            item = json.loads(f[b"item"])
            messages.append(
                Message(
                    id=mid,
                    job_id=f[b"job"].decode(),
                    item=item,
                    deliveries=int(deliveries.get(raw_id, 1)),
                    last_error=err.decode() if err else None,
                    enqueued_at=float(f.get(b"at", b"0")),
                    solo=int(solo or 0),
                )
            )
        blob_keys = [m.item["blob"] for m in messages if m.item.get("blob")]
        if blob_keys:
            blobs = dict(zip(blob_keys, self.redis.mget(blob_keys), strict=True))
            for m in messages:
                key = m.item.get("blob")
                if key:
                    if blobs[key] is None:
                        m.item["blob_missing"] = True
                    else:
                        m.item["content"] = blobs[key]
        return messages


# ---------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    item TEXT NOT NULL,
    blob_id INTEGER,
    enqueued_at REAL NOT NULL,
    consumer TEXT,
    delivered_at REAL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    solo INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_waiting ON messages (consumer, id);
CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    item TEXT NOT NULL,
    error TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    at REAL NOT NULL
);
"""


_LOCAL_BLOB = "local:"  # a dead letter's pointer into the embedded queue's blobs table


class LocalQueue:
    """A durable single-host queue in SQLite (WAL, ``synchronous=FULL``) for embedded mode.

    Same semantics as :class:`RedisStreamQueue`: a message read by a consumer is pending until
    acked; ``reclaim`` re-delivers messages idle longer than ``min_idle_ms`` (the visibility
    timeout). Messages pending when the process died are reclaimed after a restart. Spilled
    payloads live in the ``blobs`` table and are deleted with their message on ack. Safe to
    share between threads; several processes may open the same file (SQLite locking).
    """

    def __init__(self, path: str | Path, *, spill_bytes: int = DEFAULT_SPILL_BYTES) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spill_bytes = spill_bytes
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(messages)")}
        if "solo" not in columns:  # a queue file from before per-item solo counts
            self._db.execute("ALTER TABLE messages ADD COLUMN solo INTEGER NOT NULL DEFAULT 0")
        self._opened_at = time.time()  # messages delivered before this are a dead process's

    def enqueue(self, job_id: str, items: Sequence[dict[str, Any]]) -> list[str]:
        prepared = [_prepare(item, self.spill_bytes) for item in items]
        now = time.time()
        ids = []
        with self._arrived:
            with immediate(self._db) as cur:
                for entry, blob in prepared:
                    blob_id = None
                    if blob is not None:
                        cur.execute("INSERT INTO blobs (data) VALUES (?)", (blob,))
                        blob_id = cur.lastrowid
                    cur.execute(
                        "INSERT INTO messages (job_id, item, blob_id, enqueued_at) "
                        "VALUES (?, ?, ?, ?)",
                        (job_id, _dumps(entry), blob_id, now),
                    )
                    ids.append(str(cur.lastrowid))
            self._arrived.notify_all()
        return ids

    def read(self, consumer: str, count: int, block_ms: int = 0) -> list[Message]:
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        with self._arrived:
            while True:
                rows = self._claim(
                    consumer,
                    "SELECT id FROM messages WHERE consumer IS NULL ORDER BY id LIMIT ?",
                    (count,),
                )
                if rows:
                    return rows
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                # Another process may enqueue too: poll as well as waiting for a notify.
                self._arrived.wait(min(remaining, 0.25))

    def ack(self, message_ids: Iterable[str]) -> None:
        ids = [int(i) for i in message_ids]
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._lock, immediate(self._db) as cur:
            cur.execute(
                f"DELETE FROM blobs WHERE id IN "
                f"(SELECT blob_id FROM messages WHERE id IN ({marks}))",
                ids,
            )
            cur.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)

    def nack(self, message: Message, error: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE messages SET last_error = ? WHERE id = ?", (error[:2000], int(message.id))
            )

    def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Message]:
        cutoff = time.time() - min_idle_ms / 1000
        with self._lock:
            return self._claim(
                consumer,
                "SELECT id FROM messages WHERE consumer IS NOT NULL AND delivered_at <= ? "
                "ORDER BY id LIMIT ?",
                (cutoff, count),
            )

    def recover(self, consumer: str, count: int) -> list[Message]:
        with self._lock:
            return self._claim(
                consumer,
                "SELECT id FROM messages WHERE consumer IS NOT NULL AND delivered_at < ? "
                "ORDER BY id LIMIT ?",
                (self._opened_at, count),
            )

    def mark_solo(self, message: Message) -> int:
        with self._lock:
            self._db.execute("UPDATE messages SET solo = solo + 1 WHERE id = ?", (int(message.id),))
            row = self._db.execute(
                "SELECT solo FROM messages WHERE id = ?", (int(message.id),)
            ).fetchone()
        message.solo = int(row[0]) if row else message.solo + 1
        return message.solo

    def reclaim_dead(self, consumer: str, count: int) -> list[Message]:
        return []

    def dead_letter(self, message: Message, error: str) -> None:
        # Keep what re-queueing needs: a small inline ``data`` stays in the item, a spilled
        # payload stays in ``blobs`` and the item points at it (``local:<blob id>``); the blob
        # goes when the dead letter does (delete_dead_letters).
        item = {
            k: v
            for k, v in message.item.items()
            if k not in ("content", "blob", "blob_missing")
            and not (k == "data" and not isinstance(v, str))
        }
        with self._lock, immediate(self._db) as cur:
            row = cur.execute(
                "SELECT blob_id FROM messages WHERE id = ?", (int(message.id),)
            ).fetchone()
            if row is not None and row[0] is not None:
                item["blob"] = f"{_LOCAL_BLOB}{int(row[0])}"
            cur.execute(
                "INSERT INTO dead_letters (message_id, job_id, item, error, deliveries, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    message.id,
                    message.job_id,
                    _dumps(item),
                    error[:2000],
                    message.deliveries,
                    time.time(),
                ),
            )
            cur.execute("DELETE FROM messages WHERE id = ?", (int(message.id),))
        _log_dead_letter(message, error)

    def depth(self) -> int:
        return self._count("SELECT COUNT(*) FROM messages WHERE consumer IS NULL")

    def pending(self) -> int:
        return self._count("SELECT COUNT(*) FROM messages WHERE consumer IS NOT NULL")

    def dead_letters(self) -> int:
        return self._count("SELECT COUNT(*) FROM dead_letters")

    def list_dead_letters(self, count: int = 100) -> list[DeadLetter]:
        with self._lock:
            rows = self._db.execute(
                "SELECT message_id, job_id, item, error, deliveries, at FROM dead_letters "
                "ORDER BY id DESC LIMIT ?",
                (count,),
            ).fetchall()
        return [
            DeadLetter(
                message_id=r[0],
                job_id=r[1],
                item=json.loads(r[2]),
                error=r[3],
                deliveries=r[4],
                at=r[5],
            )
            for r in reversed(rows)
        ]

    def delete_dead_letters(self, message_ids: Iterable[str]) -> int:
        """Drop the dead letters of these message ids (after a requeue); returns how many."""
        ids = list(message_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._lock, immediate(self._db) as cur:
            blobs = [
                int(b[len(_LOCAL_BLOB) :])
                for (item_json,) in cur.execute(
                    f"SELECT item FROM dead_letters WHERE message_id IN ({marks})", ids
                ).fetchall()
                if str(b := json.loads(item_json).get("blob") or "").startswith(_LOCAL_BLOB)
            ]
            if blobs:
                cur.execute(f"DELETE FROM blobs WHERE id IN ({','.join('?' * len(blobs))})", blobs)
            cur.execute(f"DELETE FROM dead_letters WHERE message_id IN ({marks})", ids)
            return int(cur.rowcount)

    def load_blob(self, key: str) -> bytes | None:
        """The payload a dead letter kept (``local:<blob id>``), or None."""
        if not key.startswith(_LOCAL_BLOB):
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT data FROM blobs WHERE id = ?", (int(key[len(_LOCAL_BLOB) :]),)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def stats(self) -> dict[str, int]:
        return {
            "depth": self.depth(),
            "pending": self.pending(),
            "dead_letters": self.dead_letters(),
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _count(self, sql: str) -> int:
        with self._lock:
            return int(self._db.execute(sql).fetchone()[0])

    def _claim(self, consumer: str, select: str, params: tuple[Any, ...]) -> list[Message]:
        """Assign the selected messages to ``consumer`` in one transaction (lock held)."""
        with immediate(self._db) as cur:
            ids = [r[0] for r in cur.execute(select, params).fetchall()]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            cur.execute(
                f"UPDATE messages SET consumer = ?, delivered_at = ?, deliveries = deliveries + 1 "
                f"WHERE id IN ({marks})",
                (consumer, time.time(), *ids),
            )
            rows = cur.execute(
                f"SELECT m.id, m.job_id, m.item, m.deliveries, m.last_error, m.enqueued_at, "
                f"m.blob_id, b.data, m.solo FROM messages m LEFT JOIN blobs b ON b.id = m.blob_id "
                f"WHERE m.id IN ({marks}) ORDER BY m.id",
                ids,
            ).fetchall()
        messages = []
        for mid, job_id, item_json, deliveries, last_error, at, blob_id, data, solo in rows:
            item = json.loads(item_json)
            if blob_id is not None:
                if data is None:
                    item["blob_missing"] = True
                else:
                    item["content"] = bytes(data)
            messages.append(
                Message(
                    id=str(mid),
                    job_id=job_id,
                    item=item,
                    deliveries=deliveries,
                    last_error=last_error,
                    enqueued_at=at,
                    solo=solo,
                )
            )
        return messages


__all__ = [
    "DeadLetter",
    "IngestQueue",
    "LocalQueue",
    "MediaError",
    "Message",
    "RedisStreamQueue",
]
