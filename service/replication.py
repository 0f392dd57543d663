"""Replicating vectors from the workers to every API replica (distributed / Redis mode).

Design
------
Workers never write index files in Redis mode. They publish each encoded item as one entry of
a Redis stream, the *vector log* (``xmodal:vectors``, one per deployment)::

    op=u  m=<modality> id=<item id> h=<content hash> k=<n vectors> d=<dim>
          v=<float32 bytes, [k,d] C order> meta=<JSON metadata> seg=<JSON [[start,end],...] | "">
    op=d  ids=<JSON list of item ids>                                  (a delete tombstone)

A batch of entries is written in one MULTI/EXEC together with ``xmodal:vectors:hash`` (item id
-> ``"<modality>:<content hash>"``, what the workers consult to skip re-encoding unchanged
content), and only after EXEC returns does the worker ``XACK`` the ingest messages. So an
acknowledged item is in the log — as durable as Redis is configured to be: run Redis with
``appendonly yes`` and ``appendfsync always`` (or ``everysec``, accepting up to one second of
loss on a Redis crash), and replicas for HA.

Every API replica runs a :class:`ReplicaApplier` over its own galleries (own disk). It tails
the log with ``XREAD`` from its galleries' ``applied_offset`` and applies entries *in stream
order* through ``Gallery.upsert(records, offset=<entry id>)`` / ``Gallery.remove(ids,
offset=<entry id>)``, which persist the offset atomically with the change (the gallery's WAL);
entries at or below a gallery's offset are skipped for that gallery, so replay after a crash is
exact, never double-applied or reordered. Galleries that got nothing in a batch have their
offset advanced with an empty ``upsert([], offset)``. A re-ingested id that changed modality is
removed from the other galleries first. Since the log is totally ordered and applying it is
deterministic, every replica that reached the same offset holds the same items, and answers the
same; a restarted replica resumes from its snapshot + WAL and catches up from its offset; a new
replica with an empty disk replays the log from the start. The applier snapshots its galleries
every ``snapshot_interval_s`` when they changed (and on stop), bounding WAL replay at start-up.

``DELETE /items/{id}`` in Redis mode calls :meth:`ReplicationPublisher.publish_delete` (a
tombstone entry), and may wait for its own replica with :meth:`ReplicaApplier.wait_for` to read
its own write.

Retention. The log is not trimmed by default (``maxlen=None``): it is the source of truth a new
replica bootstraps from. To bound it, set ``maxlen`` and seed new replicas from a peer's data
directory (a consistent snapshot + WAL: they carry their offset). A replica whose offset fell
behind trimmed entries cannot be correct: :class:`ReplicaApplier` detects it (Redis' stream
first entry or ``max-deleted-entry-id`` is past the offset), logs an error and sets ``gap``
(surface it in ``/readyz``), instead of silently serving a divergent index.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.gallery import Gallery, Record

logger = logging.getLogger(__name__)

VECTORS_STREAM = "xmodal:vectors"


def parse_offset(offset: str | bytes | None) -> tuple[int, int]:
    """A stream id ``"<ms>-<seq>"`` as a comparable tuple (None = before everything)."""
    if offset is None:
        return (0, 0)
    if isinstance(offset, bytes):
        offset = offset.decode()
    ms, _, seq = offset.partition("-")
    return (int(ms), int(seq or 0))


@dataclass
class LogEntry:
    """One decoded vector-log entry."""

    offset: str
    op: str  # "u" (upsert) or "d" (delete)
    modality: str | None = None
    record: Record | None = None
    ids: list[str] | None = None


def encode_upsert(modality: str, record: Record) -> dict[str, Any]:
    """Stream fields for one upsert."""
    v = np.ascontiguousarray(record.vectors, dtype=np.float32)
    return {
        "op": "u",
        "m": modality,
        "id": record.id,
        "h": record.content_hash,
        "k": str(v.shape[0]),
        "d": str(v.shape[1]),
        "v": v.tobytes(),
        "meta": json.dumps(record.metadata, separators=(",", ":"), ensure_ascii=False),
        "seg": json.dumps(record.segments) if record.segments is not None else "",
    }


def decode_entry(offset: str | bytes, fields: Mapping[bytes, bytes]) -> LogEntry:
    """Parse stream fields written by :func:`encode_upsert` or a delete tombstone."""
    sid = offset.decode() if isinstance(offset, bytes) else offset
    op = fields[b"op"].decode()
    if op == "d":
        return LogEntry(offset=sid, op="d", ids=json.loads(fields[b"ids"]))
    k, d = int(fields[b"k"]), int(fields[b"d"])
    vectors = np.frombuffer(fields[b"v"], dtype=np.float32).reshape(k, d)
    seg = fields.get(b"seg", b"")
    record = Record(
        id=fields[b"id"].decode(),
        vectors=vectors,
        metadata=json.loads(fields[b"meta"]),
        content_hash=fields[b"h"].decode(),
        segments=[tuple(s) for s in json.loads(seg)] if seg else None,  # type: ignore[misc]
    )
    return LogEntry(offset=sid, op="u", modality=fields[b"m"].decode(), record=record)


class ReplicationPublisher:
    """The workers' side (and the API's, for deletes): append to the vector log.

    Implements the worker's ``VectorSink`` (``write``, ``known_hashes``).
    """

    def __init__(
        self,
        url: str,
        stream: str = VECTORS_STREAM,
        *,
        maxlen: int | None = None,
        client: Any = None,
    ) -> None:
        import redis

        self.redis: Any = client if client is not None else redis.Redis.from_url(url)
        self.stream = stream
        self.hash_key = f"{stream}:hash"
        self.maxlen = maxlen

    def write(self, records: Mapping[str, Sequence[Record]]) -> str | None:
        """Append upserts (modality -> records) atomically; durable on return.

        Returns the stream id of the last entry (None when there was nothing to write).
        """
        pipe = self.redis.pipeline(transaction=True)
        n = 0
        for modality, recs in records.items():
            for rec in recs:
                pipe.xadd(self.stream, encode_upsert(modality, rec), **self._trim())
                pipe.hset(self.hash_key, rec.id, f"{modality}:{rec.content_hash}")
                n += 1
        if not n:
            return None
        out = pipe.execute()
        return str(out[-2].decode())

    def publish_delete(self, ids: Iterable[str]) -> str | None:
        """Append a delete tombstone for ``ids``; every replica removes them. Returns its id."""
        ids = list(dict.fromkeys(ids))
        if not ids:
            return None
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.stream, {"op": "d", "ids": json.dumps(ids)}, **self._trim())
        pipe.hdel(self.hash_key, *ids)
        sid = pipe.execute()[0]
        return str(sid.decode())

    def known_hashes(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``id -> (modality, content_hash)`` for ids already in the log."""
        ids = list(ids)
        if not ids:
            return {}
        out = {}
        for item_id, value in zip(ids, self.redis.hmget(self.hash_key, ids), strict=True):
            if value:
                modality, _, digest = value.decode().partition(":")
                out[item_id] = (modality, digest)
        return out

    def last_offset(self) -> str | None:
        """Id of the newest entry in the log (None when empty)."""
        rows = self.redis.xrevrange(self.stream, count=1)
        return rows[0][0].decode() if rows else None

    def close(self) -> None:
        self.redis.close()

    def _trim(self) -> dict[str, Any]:
        return {"maxlen": self.maxlen, "approximate": True} if self.maxlen else {}


class ReplicaApplier:
    """An API replica's side: tail the vector log into local galleries (see module docstring).

    Args:
        url: Redis URL.
        galleries: modality -> Gallery (the replica's own, on its own disk).
        stream: the vector log's key.
        snapshot_interval_s: snapshot changed galleries this often (0 = only on stop).
        batch: entries read per XREAD.
    """

    def __init__(
        self,
        url: str,
        galleries: Mapping[str, Gallery],
        stream: str = VECTORS_STREAM,
        *,
        snapshot_interval_s: float = 300.0,
        batch: int = 512,
        client: Any = None,
    ) -> None:
        import redis

        self.redis: Any = client if client is not None else redis.Redis.from_url(url)
        self.galleries = dict(galleries)
        self.stream = stream
        self.snapshot_interval_s = snapshot_interval_s
        self.batch = batch
        self.gap = False  # True when entries this replica needed were trimmed away
        self.applied = 0  # entries applied since start
        self._position = (
            min((g.applied_offset for g in self.galleries.values()), key=parse_offset, default=None)
            or "0-0"
        )
        self._progress = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snapshot_versions = {m: g.version for m, g in self.galleries.items()}
        self._last_snapshot = time.monotonic()
        self._check_gap()

    @property
    def position(self) -> str:
        """The last log entry this replica has applied (or skipped as already applied)."""
        return self._position

    def lag(self) -> int:
        """Entries in the log after this replica's position (0 = caught up)."""
        return len(self.redis.xrange(self.stream, min=f"({self._position}", count=10_000))

    def poll(self, block_ms: int = 0) -> int:
        """Read and apply the next batch of entries; returns how many were read."""
        reply = self.redis.xread(
            {self.stream: self._position},
            count=self.batch,
            block=block_ms if block_ms > 0 else None,
        )
        rows = [row for _, entries in (reply or []) for row in entries]
        if not rows:
            return 0
        self.apply([decode_entry(sid, fields) for sid, fields in rows])
        return len(rows)

    def catch_up(self) -> int:
        """Apply everything in the log now; returns the number of entries read."""
        total = 0
        while n := self.poll():
            total += n
        return total

    def apply(self, entries: Sequence[LogEntry]) -> None:
        """Apply entries in log order (idempotent per gallery offset)."""
        run: list[Record] = []
        run_modality: str | None = None
        run_offset: str | None = None

        def flush() -> None:
            nonlocal run, run_modality
            if run_modality is not None and run:
                self.galleries[run_modality].upsert(run, offset=run_offset)
            run, run_modality = [], None

        for e in entries:
            pos = parse_offset(e.offset)
            if e.op == "d":
                flush()
                for g in self.galleries.values():
                    if pos > parse_offset(g.applied_offset):
                        g.remove(e.ids or [], offset=e.offset)
                continue
            assert e.record is not None and e.modality is not None
            target = self.galleries.get(e.modality)
            if target is None:
                logger.error("vector log entry %s: unknown modality %r", e.offset, e.modality)
                continue
            if run_modality not in (None, e.modality):
                flush()
            # A re-ingested id that changed modality leaves its old gallery.
            for modality, g in self.galleries.items():
                if (
                    modality != e.modality
                    and e.record.id in g
                    and pos > parse_offset(g.applied_offset)
                ):
                    flush()
                    g.remove([e.record.id])
            if pos <= parse_offset(target.applied_offset):
                continue  # already applied before a restart
            run_modality, run_offset = e.modality, e.offset
            run.append(e.record)
        flush()
        last = entries[-1].offset if entries else None
        if last is not None:
            for g in self.galleries.values():
                if parse_offset(g.applied_offset) < parse_offset(last):
                    g.upsert([], offset=last)  # nothing for this gallery: just move its offset
            with self._progress:
                self._position = last
                self.applied += len(entries)
                self._progress.notify_all()
        self._maybe_snapshot()

    def wait_for(self, offset: str, timeout: float = 5.0) -> bool:
        """Block until this replica applied the log up to ``offset`` (read-your-writes)."""
        target = parse_offset(offset)
        deadline = time.monotonic() + timeout
        with self._progress:
            while parse_offset(self._position) < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    def snapshot(self) -> None:
        """Snapshot every gallery that changed since the last snapshot."""
        for modality, g in self.galleries.items():
            if g.version != self._snapshot_versions.get(modality):
                g.snapshot()
                self._snapshot_versions[modality] = g.version
        self._last_snapshot = time.monotonic()

    def run(self, block_ms: int = 1000) -> None:
        """Tail the log until :meth:`stop` (errors are logged and retried with backoff)."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self.poll(block_ms)
                backoff = 0.5
            except Exception:
                logger.exception("replica applier failed; retrying in %.1f s", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)  # resume soon after an outage
        self.snapshot()

    def start(self, block_ms: int = 1000) -> ReplicaApplier:
        """Run in a daemon thread (catch up first: the caller sees a warm replica)."""
        self.catch_up()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(block_ms,), name="xmodal-replica-applier", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop tailing after the current batch and snapshot changed galleries."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self.redis.close()

    def _maybe_snapshot(self) -> None:
        if (
            self.snapshot_interval_s > 0
            and time.monotonic() - self._last_snapshot >= self.snapshot_interval_s
        ):
            self.snapshot()

    def _check_gap(self) -> None:
        try:
            info = self.redis.xinfo_stream(self.stream)
        except Exception:  # noqa: BLE001 - no stream yet: nothing was trimmed
            return
        position = parse_offset(self._position)
        deleted = parse_offset(info.get("max-deleted-entry-id"))  # XDEL'd entries
        first = info.get("first-entry")
        trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
        # Trimming removes from the head: entries between our position and the first one left
        # may be gone (conservative when we sit exactly on the last trimmed entry).
        if deleted > position or (trimmed and first and parse_offset(first[0]) > position):
            self.gap = True
            logger.error(
                "vector log entries after %s were trimmed before this replica applied them: "
                "its index is incomplete; seed its data dir from a peer replica",
                self._position,
            )
