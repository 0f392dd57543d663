"""The ingestion worker: read a batch -> decode -> encode in batches -> write vectors -> ack.

One loop, many workers: messages come from a consumer group (Redis Streams) or the local SQLite
queue; each worker forms *dynamic batches* across jobs (up to ``worker.batch_size`` items, or
what arrived within ``worker.batch_wait_ms`` of the first), so a trickle of single-item jobs and
a bulk upload share the GPU equally well.

Per batch:

1. first deliveries are processed together; redelivered messages (their worker crashed, or
   they failed) one by one, each try alone counted durably first (``queue.mark_solo``); only a
   message that crashed or failed alone ``worker.max_deliveries`` times is dead-lettered with
   its last error (and its job item failed), never the innocent batch-mates of a crash;
2. items move to ``encoding``; each is decoded (:mod:`service.media`; embedded mode takes the
   picture ``POST /ingest`` decoded to validate it, :mod:`service.handoff`), its thumbnail rendered
   from the full-size decode, and images and video frames fitted to the model's input size
   (``model.fit_image``). Bad media is the client's fault and permanent: the item is ``failed``
   with the reason and acked at once, never retried and never blocking anything;
3. items whose id already holds the same content hash (sha256 of the raw bytes / cleaned text)
   are skipped: ingest is idempotent, and unchanged content is not re-encoded (decided when
   the batch is encoded, after the batch before the one being written is written, and never
   for an id that pending write holds, so a read-ahead batch never judges against a stale
   hash and the last write wins);
4. the rest are encoded per modality in batches (``model.embed_texts``/``embed_images``; videos:
   every sampled frame through the image tower in one batch, pooled per segment with
   ``model.pool_frames`` -> one vector per segment; set models pool the whole clip into K
   slots). If a batch call fails, items are retried one by one so a poison item is isolated;
5. Records go to the sink and are durable on return (embedded: ``Gallery.upsert`` fsyncs its
   WAL; Redis mode: the vector log, see :mod:`service.replication`);
6. only then are items marked ``indexed`` and their messages acked (marking first: a crash in
   between redelivers an already-written item, which is a no-op, rather than leaving a job
   stuck in ``encoding``).

**Decode-ahead.** :meth:`Worker.run` is a two-stage pipeline: while one batch encodes, a
prefetch thread reads the next batch from the queue and decodes it (step 2, on the decode
pool), and a batch's video chunks are decoded one chunk ahead of the chunk being encoded. At
most one batch and one video chunk wait decoded, so memory stays bounded (about two frame
budgets of fitted frames). The prefetched batch is ordinary pending work: a decode failure
fails only its item, exactly as in the in-line path (:meth:`Worker.run_once`, same code), and
``stop()`` finishes the in-flight batch *and* the one decoded behind it, so nothing read is
left half done (a crash leaves both pending: recovered as below).

**Write-behind.** Steps 5-6 of a batch (thumbnails, vectors, marks, ack) run on one writer
thread while the loop encodes the next batch, so the encoder never waits for an fsync or a
QB-Norm update; one thread keeps the writes in read order, and the loop waits for a write
before queueing the one after next (at most one batch waits encoded). Redeliveries, tried
alone, run in line once the pending write has landed. :meth:`Worker.run_once` and
:meth:`Worker.process` stay in line (they return after the ack).

Unexpected errors (not bad media) are recorded with ``nack`` and the message stays pending; it
is reclaimed (``XAUTOCLAIM``) after ``worker.claim_idle_ms`` by whichever worker gets there
first. Crashed work comes back faster: a starting worker first takes back what its consumer
held when it died (``queue.recover``), and Redis workers beat their heartbeat record
(:mod:`service.heartbeat`, TTL ``worker.heartbeat_ttl_s``) from a thread of their own, so a
peer whose beats stopped has its pending entries claimed in full batches within seconds
(``queue.reclaim_dead``).
``stop()`` lets the in-flight batch (and the prefetched one) finish.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from index.gallery import Gallery, Record
from service import media
from service.handoff import DecodedPhotos
from service.jobs import ItemUpdate, JobStore
from service.media import DecodedVideo, MediaError, VideoInfo
from service.queue import IngestQueue, Message
from service.settings import IngestSettings, Settings, WorkerSettings
from service.sinks import GallerySink, VectorSink
from service.thumbnails import Preview, ThumbnailWriter

logger = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one batch did (also handed to ``on_batch``)."""

    read: int = 0
    indexed: int = 0
    unchanged: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    encode_seconds: float = 0.0
    by_modality: dict[str, int] = field(default_factory=dict)


@dataclass
class _PendingVideo:
    raw: bytes
    info: VideoInfo


@dataclass
class _Work:
    msg: Message
    modality: str
    content: Any  # str (text), PIL image fitted to the model input, _PendingVideo, DecodedVideo
    digest: str
    preview: Preview | None = None  # its thumbnail, rendered from the full-size decode

    @property
    def item_id(self) -> str:
        return str(self.msg.item["id"])


@dataclass
class _Decoded:
    """First deliveries of a batch, decoded: what is left to encode, and what is settled."""

    report: BatchReport
    updates: list[ItemUpdate] = field(default_factory=list)  # failed so far
    done: list[Message] = field(default_factory=list)  # to ack with the batch
    work: list[_Work] = field(default_factory=list)  # texts and images, decoded
    video_chunks: list[list[_Work]] = field(default_factory=list)  # chunk 0 decoded already


def _all_work(batch: _Decoded) -> list[_Work]:
    """Every item of a decoded batch: texts and images, then each video chunk's."""
    return batch.work + [w for c in batch.video_chunks for w in c]


@dataclass
class _Batch:
    """A batch read from the queue: first deliveries decoded, redeliveries tried alone later."""

    fresh: _Decoded | None
    redelivered: list[Message]
    read_at: float  # time.monotonic() before its first message was read


class Worker:
    """Consumes the ingest queue into a vector sink (see the module docstring).

    Args:
        model: an ``XModal`` (``embed_texts``, ``embed_images``, ``embed_video_frames``,
            ``pool_frames``, ``is_set_model``); its device is where encoding runs.
        queue: the ingest queue.
        jobs: the job store.
        sink: :class:`GallerySink` (embedded) or ``ReplicationPublisher`` (Redis mode).
        settings: the service settings (``worker`` and ``ingest`` sections are used).
        consumer: consumer name in the group (default ``settings.worker.consumer``); every
            concurrently running worker needs its own.
        on_batch: called with each :class:`BatchReport` (tests, custom metrics).
        record_metrics: record into :mod:`service.metrics` (Prometheus).
        stop_event: an event shared with the caller; setting it stops the loop (like stop()).
        decode_threads: threads decoding media in parallel (default: settings.worker).
        handoff: photos the API decoded to validate (embedded mode): taken instead of
            decoding the same bytes again (:mod:`service.handoff`).
    """

    def __init__(
        self,
        model: Any,
        queue: IngestQueue,
        jobs: JobStore,
        sink: VectorSink,
        settings: Settings,
        *,
        consumer: str | None = None,
        on_batch: Callable[[BatchReport], None] | None = None,
        record_metrics: bool = True,
        stop_event: threading.Event | None = None,
        decode_threads: int | None = None,
        handoff: DecodedPhotos | None = None,
    ) -> None:
        self.model = model
        self.handoff = handoff
        self.queue = queue
        self.jobs = jobs
        self.sink = sink
        self.cfg: WorkerSettings = settings.worker
        self.ingest: IngestSettings = settings.ingest
        self.consumer = consumer or settings.worker.consumer
        self.on_batch = on_batch
        self.record_metrics = record_metrics
        self._stop = stop_event if stop_event is not None else threading.Event()
        threads = decode_threads if decode_threads is not None else self.cfg.decode_threads
        threads = threads or min(4, os.cpu_count() or 1)
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="xmodal-decode") if threads > 1 else None
        )
        # decode-ahead: the next batch (run) and the next video chunk (both paths), one each
        self._ahead = ThreadPoolExecutor(2, thread_name_prefix="xmodal-prefetch")
        # write-behind (run): one batch's write while the next encodes, in order (one thread)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="xmodal-write")
        self._writing: Future[BatchReport] | None = None
        self._writing_ids: frozenset[str] = frozenset()  # the ids that write holds
        self._fit: Callable[[Any], Any] = getattr(model, "fit_image", None) or (lambda im: im)
        self._busy = threading.Lock()  # held while a batch is in flight
        self._claim_every = max(0.05, min(self.cfg.claim_idle_ms / 2000, 30.0))
        self._next_claim = 0.0
        self.thumbnails = ThumbnailWriter(settings)  # previews for the search page
        self._recovered = False  # recover() this consumer's own pending work first
        self._settings = settings
        self._next_dead_check = 0.0
        self._in_flight_since: float | None = None  # read_at of the batch run() is encoding

    # ---- loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Process batches until :meth:`stop`; errors are logged, the loop keeps going."""
        logger.info("worker %s started", self.consumer)
        # Redis mode: the one liveness record (service.heartbeat), from a thread of its own so a
        # long batch never looks dead; /readyz reads it, and peers reclaim work once it expires
        heartbeat = None
        if getattr(self.queue, "redis", None) is not None:
            from service.heartbeat import start_worker_heartbeat

            heartbeat = start_worker_heartbeat(self._settings, self)
        backoff = 0.5
        ahead: Future[_Batch | None] | None = None  # the next batch, read and decoding
        while not self._stop.is_set() or ahead is not None:  # stopping: finish the prefetched
            try:
                if ahead is not None:
                    pending, ahead = ahead, None
                    batch = pending.result()  # raises what reading or decoding raised
                else:
                    batch = self._read_batch(self.cfg.read_block_ms)
                if batch is None:
                    continue
                if not self._stop.is_set():
                    ahead = self._ahead.submit(self._read_batch, self.cfg.read_block_ms)
                with self._busy:
                    self._in_flight_since = batch.read_at
                    try:
                        self._pipelined(batch)
                    finally:
                        self._in_flight_since = None
                backoff = 0.5
            except Exception:
                logger.exception(
                    "worker %s: batch failed; retrying in %.1f s", self.consumer, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)  # resume soon after an outage
        try:
            self._settle_write()  # the last batch's write
        except Exception:
            logger.exception("worker %s: writing the last batch failed", self.consumer)
        if heartbeat is not None:
            heartbeat.stop()  # no longer live: its key goes at once
        self.close()
        logger.info("worker %s stopped", self.consumer)

    def stop(self) -> None:
        """Ask the loop to exit after the in-flight batch."""
        self._stop.set()

    def close(self) -> None:
        """Release the decode threads (after the loop ended, or when only run_once is used)."""
        self._ahead.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_once(self, block_ms: int | None = None) -> BatchReport:
        """Collect one dynamic batch (waiting up to ``block_ms`` for the first message) and
        process it. Returns what happened (``read == 0`` when idle)."""
        batch = self._read_batch(block_ms if block_ms is not None else self.cfg.read_block_ms)
        if batch is None:
            return BatchReport()
        with self._busy:
            return self._finish(batch)

    def _read_batch(self, block_ms: int) -> _Batch | None:
        """Collect a dynamic batch and decode its first deliveries (None when idle). Runs on
        the prefetch thread in :meth:`run`, in line in :meth:`run_once`."""
        read_at = time.monotonic()
        messages = self._collect(block_ms)
        if not messages:
            self._update_queue_gauges()
            return None
        return self._read_ahead(messages, read_at)

    def _read_ahead(self, messages: Sequence[Message], read_at: float) -> _Batch:
        fresh = [m for m in messages if m.deliveries <= 1]
        return _Batch(
            self._decode_batch(fresh) if fresh else None,
            [m for m in messages if m.deliveries > 1],
            read_at,
        )

    def _may_reclaim(self, now: float) -> bool:
        """Whether reclaiming stuck deliveries is safe now: never while this worker's own
        in-flight batch (read ahead of it) is old enough to look stuck itself."""
        since = self._in_flight_since
        return since is None or now - since < self.cfg.claim_idle_ms / 2000

    def _collect(self, block_ms: int) -> list[Message]:
        size = self.cfg.batch_size
        messages: list[Message] = []
        now = time.monotonic()
        if not self._recovered:  # what this consumer held when it died: at once
            messages += self.queue.recover(self.consumer, size)
            self._recovered = len(messages) < size
        if len(messages) < size and now >= self._next_dead_check:  # crashed peers' work
            self._next_dead_check = now + self.cfg.heartbeat_interval_s
            messages += self.queue.reclaim_dead(self.consumer, size - len(messages))
        if len(messages) < size and now >= self._next_claim and self._may_reclaim(now):
            want = size - len(messages)
            claimed = self.queue.reclaim(self.consumer, self.cfg.claim_idle_ms, want)
            # a full batch means there may be more: claim again next round, not next tick
            self._next_claim = now if len(claimed) == want else now + self._claim_every
            messages += claimed
        if len(messages) < size:
            messages += self.queue.read(
                self.consumer, size - len(messages), 0 if messages else block_ms
            )
        if not messages:
            return []
        # The batch window opens at the first message: top it up for batch_wait_ms.
        deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
        while len(messages) < size and not self._stop.is_set():
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            more = self.queue.read(self.consumer, size - len(messages), remaining_ms)
            if not more:
                break
            messages += more
        return messages

    # ---- one batch ----------------------------------------------------------------------

    def process(self, messages: Sequence[Message]) -> BatchReport:
        """Process a batch: first deliveries together; redelivered messages (their worker
        crashed or they failed) one by one, so a crash is pinned on the item that causes it.

        A message is dead-lettered only for its own faults: after ``max_deliveries`` tries
        alone (each counted durably before it starts, so a crash alone counts), or when it
        failed alone that often. Innocent batch-mates of a crash are never dead-lettered.
        """
        return self._finish(self._read_ahead(messages, time.monotonic()))

    def _pipelined(self, batch: _Batch) -> None:
        """:meth:`run`'s step: encode ``batch`` while the batch before it is still being
        written, then queue its own write behind that one (one writer thread: writes land
        in read order). Redeliveries, tried alone, run in line after the pending write.
        Raises what writing the batch before raised (its messages stay pending, as when a
        batch fails in line); this batch's write is queued by then."""
        if batch.fresh is None or batch.redelivered:
            self._settle_write()
            self._finish(batch)
            return
        previous = self._writing
        encoded = self._encode_fresh(batch.fresh)
        self._writing = self._writer.submit(self._write_observed, batch.fresh, *encoded)
        self._writing_ids = frozenset(w.item_id for w in _all_work(batch.fresh))
        if previous is not None:
            previous.result()

    def _settle_write(self) -> None:
        """Wait for the queued write (raising what it raised); none is pending after."""
        writing, self._writing = self._writing, None
        try:
            if writing is not None:
                writing.result()
        finally:
            self._writing_ids = frozenset()

    def _write_observed(
        self, batch: _Decoded, records: dict[str, list[Record]], written: list[_Work]
    ) -> BatchReport:
        report = self._write(batch, records, written)
        self._observe(report)
        return report

    def _finish(self, batch: _Batch) -> BatchReport:
        """Encode and write the decoded first deliveries, then try each redelivery alone."""
        report = self._encode_batch(batch.fresh) if batch.fresh is not None else BatchReport()
        for m in batch.redelivered:
            solo = self.queue.mark_solo(m)  # counted durably before the try starts
            if solo > self.cfg.max_deliveries:
                one = BatchReport(read=1)
                reason = m.last_error or "the worker crashed while processing it alone"
                self._dead_letter(m, one, f"{reason} ({solo - 1} tries alone)")
            else:
                one = self._encode_batch(self._decode_batch([m]))
            _merge(report, one)
        self._observe(report)
        return report

    def _decode_batch(self, messages: Sequence[Message]) -> _Decoded:
        """Mark ``encoding``, decode every item (the decode pool), sort out bad media, and
        decode the first chunk of videos. Everything but the encode, so it can run ahead."""
        live = list(messages)
        out = _Decoded(BatchReport(read=len(live)))
        self.jobs.set_states(ItemUpdate(m.job_id, _item_id(m), "encoding") for m in live)
        decoded = self._sort_out(live, self._map(self._decode, live), out)
        out.work = [w for w in decoded if w.modality != "video"]
        videos = [w for w in decoded if w.modality == "video"]
        out.video_chunks = _chunks_by_frames(videos, self.ingest, self.cfg.video_frame_budget)
        if out.video_chunks:
            # Unchanged content is settled when the batch is encoded (after the batch before
            # it is written); here it only spares decoding the videos that look unchanged.
            first = out.video_chunks[0]
            known = self._unchanged(first)
            out.video_chunks[0] = self._sort_out(
                [w.msg for w in first], self._load_chunk(first, skip=known), out
            )
        return out

    def _unchanged(self, work: Sequence[_Work]) -> set[str]:
        """Ids whose stored content hash is already this content's."""
        known = self.sink.known_hashes([w.item_id for w in work]) if work else {}
        # an id the write behind us holds is judged after it lands: never skipped now (what
        # is stored for it is about to change, and this later message must win)
        writing = self._writing_ids
        return {
            w.item_id
            for w in work
            if known.get(w.item_id) == (w.modality, w.digest) and w.item_id not in writing
        }

    def _load_chunk(self, chunk: Sequence[_Work], skip: Set[str] = frozenset()) -> list[Any]:
        """Decode a chunk's probed videos (decode pool): one decoded ``_Work`` or exception per
        item; those decoded already, or in ``skip``, pass as they are."""
        todo = [w for w in chunk if isinstance(w.content, _PendingVideo) and w.item_id not in skip]
        loaded = dict(zip((id(w) for w in todo), self._map(self._load_video, todo), strict=True))
        return [loaded.get(id(w), w) for w in chunk]

    def _sort_out(
        self, messages: Sequence[Message], results: Sequence[Any], batch: _Decoded
    ) -> list[_Work]:
        """Decoded items pass; bad media fails its item now; other errors retry it later."""
        ok: list[_Work] = []
        for m, result in zip(messages, results, strict=True):
            if isinstance(result, MediaError):
                self._fail(m, str(result), batch.updates, batch.done, batch.report)
            elif isinstance(result, Exception):  # unexpected: retry, then dead-letter
                logger.error("decoding item %s of job %s failed: %r", _item_id(m), m.job_id, result)
                self._retry(m, f"decode error: {result!r}", batch.report)
            else:
                ok.append(result)
        return ok

    def _encode_batch(self, batch: _Decoded) -> BatchReport:
        """Skip unchanged content, encode the rest, write, then mark and ack the batch."""
        return self._write(batch, *self._encode_fresh(batch))

    def _encode_fresh(self, batch: _Decoded) -> tuple[dict[str, list[Record]], list[_Work]]:
        """Settle unchanged content (marked ``indexed`` with the batch), encode the rest."""
        report, updates, done = batch.report, batch.updates, batch.done
        every = _all_work(batch)
        unchanged = self._unchanged(every)
        if unchanged:
            for w in every:
                if w.item_id in unchanged:
                    updates.append(ItemUpdate(w.msg.job_id, w.item_id, "indexed"))
                    done.append(w.msg)
                    report.unchanged += 1
            batch.work = [w for w in batch.work if w.item_id not in unchanged]
            batch.video_chunks = [
                [w for w in c if w.item_id not in unchanged] for c in batch.video_chunks
            ]
        return self._encode(batch)

    def _write(
        self, batch: _Decoded, records: dict[str, list[Record]], written: list[_Work]
    ) -> BatchReport:
        """Store thumbnails and vectors (durable on return), then mark and ack the batch."""
        report, updates, done = batch.report, batch.updates, batch.done
        for w in written:
            self.thumbnails.put(w.item_id, w.preview)
        if written:
            try:
                self.sink.write(records)
            except Exception as exc:  # noqa: BLE001 - storage failure: nothing was acked
                logger.exception("writing %d vectors failed", len(written))
                for w in written:
                    self._retry(w.msg, f"write error: {exc!r}", report)
                written = []
        for w in written:
            updates.append(ItemUpdate(w.msg.job_id, w.item_id, "indexed"))
            done.append(w.msg)
            report.indexed += 1
            report.by_modality[w.modality] = report.by_modality.get(w.modality, 0) + 1

        self.jobs.set_states(updates)
        self.queue.ack([m.id for m in done])
        return report

    # ---- steps --------------------------------------------------------------------------

    def _decode(self, m: Message) -> _Work:
        resolved = media.resolve_item(m.item, self.ingest)  # the route hashes the same way
        digest = resolved.content_hash
        if resolved.text is not None:
            return _Work(m, "text", resolved.text, digest, self.thumbnails.render(resolved.text))
        assert resolved.raw is not None
        if resolved.modality == "image":
            # the API's decode of these very bytes (embedded mode), else decode them here
            image = self.handoff.take(digest) if self.handoff is not None else None
            if image is None:
                image = media.load_image(resolved.raw, self.ingest)
            preview = self.thumbnails.render(image)  # from the full-size image
            return _Work(m, "image", self._fit(image), digest, preview)
        # checked now, decoded a chunk at a time under the frame budget (_load_video)
        pending = _PendingVideo(resolved.raw, media.probe_video(resolved.raw, self.ingest))
        return _Work(m, "video", pending, digest)

    def _encode(self, batch: _Decoded) -> tuple[dict[str, list[Record]], list[_Work]]:
        records: dict[str, list[Record]] = {}
        written: list[_Work] = []
        for modality in ("text", "image"):
            group = [w for w in batch.work if w.modality == modality]
            if group:
                self._encode_group(modality, group, records, written, batch.report)
        # Videos are decoded a chunk at a time under a frame budget, so a batch of long clips
        # never holds all their frames at once; chunk i + 1 decodes while chunk i encodes.
        chunks = batch.video_chunks
        ahead: Future[list[Any]] | None = None
        for i, chunk in enumerate(chunks):
            # chunk 0 was decoded with the batch (what is left of it decodes now)
            results = self._load_chunk(chunk) if ahead is None else ahead.result()
            decoded = self._sort_out([w.msg for w in chunk], results, batch)
            ahead = None
            if i + 1 < len(chunks):
                ahead = self._ahead.submit(self._load_chunk, chunks[i + 1])
            if decoded:
                self._encode_group("video", decoded, records, written, batch.report)
            for w in decoded:
                w.content = None  # drop the frames: the vectors are in the records
        return records, written

    def _load_video(self, w: _Work) -> _Work:
        """Decode a probed video: its thumbnails from the frames as sampled, then every frame
        fitted to the model's input."""
        video = media.load_video(w.content.raw, self.ingest)
        preview = self.thumbnails.render(video)
        for segment in video.segments:
            segment.frames = [self._fit(f) for f in segment.frames]
        return replace(w, content=video, preview=preview)

    def _encode_group(
        self,
        modality: str,
        group: list[_Work],
        records: dict[str, list[Record]],
        written: list[_Work],
        report: BatchReport,
    ) -> None:
        t0 = time.perf_counter()
        try:
            vectors = self._embed(modality, group)
            ok = list(zip(group, vectors, strict=True))
        except Exception:  # noqa: BLE001 - isolate the poison item
            logger.warning("batch encode of %d %s items failed; one by one", len(group), modality)
            ok = []
            for w in group:
                try:
                    ok.append((w, self._embed(modality, [w])[0]))
                except Exception as exc:  # noqa: BLE001
                    logger.exception("encoding item %s failed", w.item_id)
                    self._retry(w.msg, f"encode error: {exc!r}", report)
        seconds = time.perf_counter() - t0
        report.encode_seconds += seconds
        if self.record_metrics and ok:
            _metrics_encode(modality, len(ok), seconds)
        for w, vecs in ok:
            segments = None
            if isinstance(w.content, DecodedVideo) and not self.model.is_set_model:
                segments = w.content.spans  # one vector per segment
            metadata = w.msg.item.get("metadata") or {}
            records.setdefault(modality, []).append(
                Record(w.item_id, vecs, dict(metadata), w.digest, segments)
            )
            written.append(w)

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items`` on the decode pool; an exception is returned, not raised."""

        def safe(x: Any) -> Any:
            try:
                return fn(x)
            except Exception as exc:  # noqa: BLE001 - sorted out by the caller
                return exc

        if len(items) <= 1 or self._pool is None:
            return [safe(x) for x in items]
        return list(self._pool.map(safe, items))

    @torch.no_grad()
    def _embed(self, modality: str, group: list[_Work]) -> list[np.ndarray]:
        """One ``[K,D]`` array per item (K = 1, slots, or segments)."""
        if modality == "text":
            out = self.model.embed_texts([w.content for w in group])
            return [_as_2d(v) for v in out]
        if modality == "image":
            out = self.model.embed_images([w.content for w in group])
            return [_as_2d(v) for v in out]
        if self.model.is_set_model:
            return [_as_2d(self.model.embed_video_frames(w.content.frames)[0]) for w in group]
        # Single-vector models: every frame of every segment in one image batch, then the
        # model's own temporal pooling per segment -> one vector per segment.
        segments = [s for w in group for s in w.content.segments]
        pooled = self.model.embed_segments([s.frames for s in segments])  # [S, D]
        out_vectors, start = [], 0
        for w in group:
            n = len(w.content.segments)
            out_vectors.append(pooled[start : start + n])
            start += n
        return out_vectors

    def _fail(
        self,
        m: Message,
        error: str,
        updates: list[ItemUpdate],
        done: list[Message],
        report: BatchReport,
    ) -> None:
        logger.info("item %s of job %s failed: %s", _item_id(m), m.job_id, error)
        updates.append(ItemUpdate(m.job_id, _item_id(m), "failed", error))
        done.append(m)
        report.failed += 1
        if self.record_metrics:
            _metrics_failed(str(m.item.get("modality")))

    def _retry(self, m: Message, error: str, report: BatchReport) -> None:
        """Leave the message pending with its error: reclaimed later, or dead-lettered."""
        report.retried += 1
        # Its own failures: this one and its tries alone (a batch's encode already isolates
        # the failing item, so the first failure is its own too); batch crashes do not count.
        tries = m.solo + 1 if m.solo else m.deliveries
        if tries >= self.cfg.max_deliveries:
            self._dead_letter(m, report, error)
            return
        self.queue.nack(m, error)

    def _dead_letter(self, m: Message, report: BatchReport, error: str | None = None) -> None:
        reason = error or m.last_error or "the worker processing it crashed or timed out"
        error = f"failed after {m.deliveries} deliveries: {reason}"
        self.jobs.set_state(m.job_id, _item_id(m), "failed", error)
        self.queue.dead_letter(m, error)
        report.dead_lettered += 1
        if self.record_metrics:
            _metrics_failed(str(m.item.get("modality")))
            from service import metrics

            metrics.DEAD_LETTERED.inc()

    def _observe(self, report: BatchReport) -> None:
        if self.record_metrics:
            from service import metrics

            for modality, n in report.by_modality.items():
                metrics.ITEMS_INDEXED.labels(modality).inc(n)
                metrics.INGEST_BATCH_SIZE.labels(modality).observe(n)
            self._update_queue_gauges()
        if report.read:
            logger.info(
                "batch: %d read, %d indexed, %d unchanged, %d failed, %d retried, "
                "%d dead-lettered, encode %.3f s",
                report.read,
                report.indexed,
                report.unchanged,
                report.failed,
                report.retried,
                report.dead_lettered,
                report.encode_seconds,
            )
        if self.on_batch is not None:
            self.on_batch(report)

    def _update_queue_gauges(self) -> None:
        if not self.record_metrics:
            return
        from service import metrics

        try:
            stats = self.queue.stats()
        except Exception:  # noqa: BLE001 - gauges are best effort
            return
        metrics.QUEUE_DEPTH.set(stats.get("depth", 0))
        metrics.QUEUE_PENDING.set(stats.get("pending", 0))
        metrics.DEAD_LETTERS.set(stats.get("dead_letters", 0))


def _chunks_by_frames(
    videos: list[_Work], settings: IngestSettings, budget: int
) -> list[list[_Work]]:
    """Split videos into chunks whose estimated sampled frames stay within ``budget``."""
    chunks: list[list[_Work]] = []
    current: list[_Work] = []
    frames = 0
    for w in videos:
        n_segments = max(1, math.ceil(w.content.info.duration / settings.video_segment_seconds))
        need = n_segments * settings.video_frames_per_segment
        if current and frames + need > budget:
            chunks.append(current)
            current, frames = [], 0
        current.append(w)
        frames += need
    if current:
        chunks.append(current)
    return chunks


def _merge(into: BatchReport, other: BatchReport) -> None:
    for name in ("read", "indexed", "unchanged", "failed", "retried", "dead_lettered"):
        setattr(into, name, getattr(into, name) + getattr(other, name))
    into.encode_seconds += other.encode_seconds
    for modality, n in other.by_modality.items():
        into.by_modality[modality] = into.by_modality.get(modality, 0) + n


def _item_id(m: Message) -> str:
    return str(m.item.get("id"))


def _as_2d(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v[None, :] if v.ndim == 1 else v


def _metrics_encode(modality: str, n: int, seconds: float) -> None:
    from service import metrics

    metrics.observe_encode(modality, n, seconds)


def _metrics_failed(modality: str) -> None:
    from service import metrics

    metrics.ITEMS_FAILED.labels(modality).inc()


class EmbeddedWorker:
    """A :class:`Worker` on a background thread (``xmodal serve`` without Redis)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=worker.run, name="xmodal-worker", daemon=True)

    def start(self) -> EmbeddedWorker:
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish the in-flight batch and stop; False if it did not end within ``timeout``."""
        self.worker.stop()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def close(self) -> None:
        """Same as :meth:`stop` (the app's shutdown calls ``close`` then ``join``)."""
        self.stop()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


def start_embedded_worker(
    settings: Settings,
    model: Any,
    galleries: Mapping[str, Gallery],
    queue: IngestQueue | None = None,
    jobs: JobStore | None = None,
    *,
    consumer: str | None = None,
    on_batch: Callable[[BatchReport], None] | None = None,
    stop_event: threading.Event | None = None,
    handoff: DecodedPhotos | None = None,
) -> EmbeddedWorker:
    """Start an in-process worker writing straight into ``galleries``.

    ``queue``/``jobs`` default to the local SQLite ones under ``settings.data_dir`` — pass the
    API's own instances so enqueue wakes the worker at once; ``handoff``, the API's decoded
    photos (:mod:`service.handoff`). Stop it with ``.stop()``.
    """
    if queue is None or jobs is None:
        from service.backends import open_backends

        missing = [p for p, v in (("queue", queue), ("jobs", jobs)) if v is None]
        opened = open_backends(settings, parts=missing)
        queue = queue if queue is not None else opened.queue
        jobs = jobs if jobs is not None else opened.jobs
    assert queue is not None and jobs is not None
    worker = Worker(
        model,
        queue,
        jobs,
        GallerySink(galleries),
        settings,
        consumer=consumer or f"{settings.worker.consumer}-embedded",
        on_batch=on_batch,
        stop_event=stop_event,
        handoff=handoff,
    )
    return EmbeddedWorker(worker).start()


__all__ = [
    "BatchReport",
    "EmbeddedWorker",
    "GallerySink",
    "VectorSink",
    "Worker",
    "start_embedded_worker",
]
