"""The query encoder: micro-batches concurrent queries and keeps the model off the event loop.

Each search awaits ``encode_text`` / ``encode_image``; a per-kind collector task gathers the
queries that queued while the previous call ran (plus those arriving within ``wait_ms``, 0 by
default), up to ``max_batch``, runs one model call for all of them on the thread pool, and
hands every caller its own row. Under load this turns N model calls into N / batch; an idle
service encodes a query at once. A caller may pass ``then``, the blocking work its vector is
for (the gallery search): a query encoded alone with nothing else waiting runs it on the same
pool thread straight after the encode, so an idle service makes one thread hop per search,
not two; under load every follow-up runs on the pool in parallel, so the collector is free
for the next batch as soon as the encode returns. When more than
``max_pending`` queries are waiting, new ones are refused with :class:`Overloaded` (HTTP 429)
instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from service import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """Too many queries are already waiting; the caller should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Pending(Generic[T]):
    value: T
    future: asyncio.Future[Any] = field(repr=False)
    then: Callable[[np.ndarray], Any] | None = None  # blocking follow-up of the vector


def _call(fn: Callable[[np.ndarray], Any] | None, row: np.ndarray) -> tuple[bool, Any]:
    """``(ok, fn(row) or the exception)``; ``row`` itself without a follow-up."""
    if fn is None:
        return True, row
    try:
        return True, fn(row)
    except Exception as exc:  # noqa: BLE001 - handed to its own caller
        return False, exc


class MicroBatcher(Generic[T]):
    """Collects single inputs into batches for one blocking ``fn(list[T]) -> array[n, ...]``."""

    def __init__(
        self,
        kind: str,
        fn: Callable[[list[T]], np.ndarray],
        executor: Executor,
        max_batch: int,
        wait_ms: float,
        max_pending: int,
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.max_pending = max_pending
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"xmodal-batcher-{self.kind}"
            )

    async def stop(self) -> None:
        """Stop collecting; queries still queued are failed with a clear error."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(Overloaded("the service is shutting down"))

    async def submit(self, value: T, then: Callable[[np.ndarray], Any] | None = None) -> Any:
        """Encode one input, batched with whatever arrives at the same time: its row, or
        ``then(row)`` when given (blocking work, run on the pool; see the module docstring)."""
        if self._task is None:
            self.start()
        assert self._queue is not None
        if self._queue.qsize() >= self.max_pending:
            raise Overloaded(f"{self._queue.qsize()} {self.kind} queries already waiting")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(value, future, then))
        metrics.QUERY_ENCODER_PENDING.labels(self.kind).set(self._queue.qsize())
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # Take whatever is already waiting (it queued while the last batch encoded), and
            # wait for more only when wait_ms > 0: an idle service encodes at once.
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            deadline = loop.time() + self.wait_s
            while self.wait_s > 0 and len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(timeout, 0)))
                except asyncio.TimeoutError:
                    break
            metrics.QUERY_ENCODER_PENDING.labels(self.kind).set(self._queue.qsize())
            live = [p for p in batch if not p.future.done()]  # drop cancelled callers
            if not live:
                continue
            metrics.QUERY_BATCH_SIZE.labels(self.kind).observe(len(live))
            try:
                # alone and nothing waiting: the search follows on this thread (one hop);
                # under load the collector is not held up by a search: all go to the pool
                inline = len(live) == 1 and self._queue.empty()
                out, first = await loop.run_in_executor(self.executor, self._encode, live, inline)
            except Exception as exc:  # the collector lives on
                if len(live) == 1:
                    logger.exception("query encoding failed (%s)", self.kind)
                    _fail(live[0], exc)
                    continue
                # One bad input must not fail its neighbours: encode each on its own, so only
                # the request that raises gets the error.
                logger.warning(
                    "query encoding failed (%s, batch of %d): retrying one by one",
                    self.kind,
                    len(live),
                    exc_info=True,
                )
                await self._one_by_one(live)
                continue
            start = 0
            if first is not None:  # its follow-up ran with the encode
                _settle(live[0], *first)
                start = 1
            follow = []
            for i, p in enumerate(live[start:], start=start):
                if p.then is None:
                    _settle(p, True, out[i])
                else:
                    follow.append((p, out[i]))
            if follow:  # after the next batch's encode is on the pool, not ahead of it
                loop.call_soon(self._follow_up, follow)

    def _follow_up(self, follow: list[tuple[_Pending[T], np.ndarray]]) -> None:
        """Run follow-ups in parallel on the pool, each settling its own caller."""
        loop = asyncio.get_running_loop()
        for p, row in follow:
            try:
                done = loop.run_in_executor(self.executor, _call, p.then, row)
            except RuntimeError:  # the pool is shut down
                _fail(p, Overloaded("the service is shutting down"))
                continue
            done.add_done_callback(functools.partial(_settle_from, p))

    def _encode(
        self, live: list[_Pending[T]], inline: bool
    ) -> tuple[np.ndarray, tuple[bool, Any] | None]:
        """On the pool: one model call for the batch, then (``inline``) the first query's
        follow-up."""
        start = time.perf_counter()
        out = self.fn([p.value for p in live])
        metrics.observe_encode(f"query_{self.kind}", len(live), time.perf_counter() - start)
        return out, _call(live[0].then, out[0]) if inline else None

    async def _one_by_one(self, live: list[_Pending[T]]) -> None:
        loop = asyncio.get_running_loop()
        for p in live:
            if p.future.done():
                continue
            try:
                _, first = await loop.run_in_executor(self.executor, self._encode, [p], True)
            except Exception as exc:
                logger.exception("query encoding failed (%s, retried alone)", self.kind)
                _fail(p, exc)
                continue
            assert first is not None
            _settle(p, *first)


def _fail(p: _Pending[Any], exc: Exception) -> None:
    if not p.future.done():
        p.future.set_exception(exc)


def _settle_from(p: _Pending[Any], follow: asyncio.Future[tuple[bool, Any]]) -> None:
    if follow.cancelled():
        _fail(p, Overloaded("the service is shutting down"))
    elif follow.exception() is not None:
        _fail(p, follow.exception())  # type: ignore[arg-type]
    else:
        _settle(p, *follow.result())


def _settle(p: _Pending[Any], ok: bool, result: Any) -> None:
    """Hand a caller its result (or the exception its follow-up raised)."""
    if p.future.done():
        return
    if ok:
        p.future.set_result(result)
    else:
        p.future.set_exception(result)


class QueryEncoder:
    """Encodes search queries with the serving model: batched texts and images, off-loop."""

    def __init__(
        self,
        model: Any,
        executor: Executor,
        max_batch: int = 32,
        wait_ms: float = 0.0,
        max_pending: int = 256,
    ) -> None:
        self.model = model
        self.executor = executor
        self.max_pending = max_pending
        self._texts: MicroBatcher[str] = MicroBatcher(
            "text", model.embed_texts, executor, max_batch, wait_ms, max_pending
        )
        self._images: MicroBatcher[Any] = MicroBatcher(
            "image", model.embed_images, executor, max_batch, wait_ms, max_pending
        )

    def start(self) -> None:
        """Start the collectors (call from the serving loop)."""
        self._texts.start()
        self._images.start()

    async def stop(self) -> None:
        """Stop the collectors."""
        await self._texts.stop()
        await self._images.stop()

    async def encode_text(self, text: str, then: Callable[[np.ndarray], Any] | None = None) -> Any:
        """One text query -> its embedding ``[D]`` (or ``[K, D]``), or ``then(embedding)``
        run on the pool right after the encode."""
        return await self._texts.submit(text, then)

    async def encode_image(
        self, image: Any, then: Callable[[np.ndarray], Any] | None = None
    ) -> Any:
        """One PIL image -> its embedding ``[D]`` (or ``[K, D]``), or ``then(embedding)``."""
        return await self._images.submit(image, then)

    async def encode_video(
        self, frames: Sequence[Any], then: Callable[[np.ndarray], Any] | None = None
    ) -> Any:
        """Frames of one video -> one embedding ``[D]`` (or ``[K, D]``), not batched; or
        ``then(embedding)``, in the same pool call."""
        return await self.run(self._encode_video, list(frames), then)

    def _encode_video(self, frames: list[Any], then: Callable[[np.ndarray], Any] | None) -> Any:
        start = time.perf_counter()
        out = np.asarray(self.model.embed_video_frames(frames), dtype=np.float32)
        metrics.observe_encode("query_video", 1, time.perf_counter() - start)
        out = out[0] if out.ndim >= 2 and out.shape[0] == 1 else out
        return out if then is None else then(out)

    async def encode_texts(self, texts: Sequence[str], chunk: int = 256) -> np.ndarray:
        """Many texts (querybank) in chunks on the pool -> ``[n, D]`` (or ``[n, K, D]``)."""
        parts = []
        for i in range(0, len(texts), chunk):
            part = list(texts[i : i + chunk])
            start = time.perf_counter()
            parts.append(await self.run(self.model.embed_texts, part))
            metrics.observe_encode("querybank_text", len(part), time.perf_counter() - start)
        return np.concatenate(parts, axis=0).astype(np.float32, copy=False)

    async def run(self, fn: Callable[..., R], *args: Any) -> R:
        """Run blocking model or FAISS work on the thread pool, never on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
