"""The micro-batching query encoder (batches concurrent queries, never blocks the loop, refuses
work beyond its cap) and the OpenAPI contract of the routes."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.app import create_app
from service.encoder import Overloaded, QueryEncoder
from tests.service.test_api_helpers import make_settings


class _Counting:
    """Delegates to the model, counting ``embed_texts`` calls; can be held on a gate."""

    def __init__(self, model: Any, gate: threading.Event | None = None) -> None:
        self.model = model
        self.gate = gate
        self.batches: list[int] = []

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(30)
        self.batches.append(len(texts))
        if any(t == "boom" for t in texts):
            raise RuntimeError("model failure")
        return self.model.embed_texts(texts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_concurrent_texts_share_model_calls(model: Any) -> None:
    texts = [f"query number {i}" for i in range(12)]
    counting = _Counting(model)

    async def main() -> list[np.ndarray]:
        with ThreadPoolExecutor(2) as pool:
            enc = QueryEncoder(counting, pool, max_batch=32, wait_ms=50)
            enc.start()
            try:
                return list(await asyncio.gather(*(enc.encode_text(t) for t in texts)))
            finally:
                await enc.stop()

    out = asyncio.run(main())
    assert sum(counting.batches) == len(texts)
    assert len(counting.batches) < len(texts)  # batched, not one call per query
    expected = model.embed_texts(texts)
    np.testing.assert_allclose(np.stack(out), expected, atol=1e-5)


def test_without_a_wait_queries_that_queue_during_a_call_form_the_next_batch(model: Any) -> None:
    """wait_ms=0 (the default): the first query is encoded at once, alone; the ones that queue
    while it encodes share the next call instead of waiting for a window."""
    gate = threading.Event()
    counting = _Counting(model, gate)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            enc = QueryEncoder(counting, pool, max_batch=32, wait_ms=0)
            enc.start()
            try:
                first = asyncio.ensure_future(enc.encode_text("first"))
                await asyncio.sleep(0.1)  # the collector dispatched it and waits on the gate
                rest = [asyncio.ensure_future(enc.encode_text(f"q{i}")) for i in range(9)]
                await asyncio.sleep(0.05)
                gate.set()
                await asyncio.gather(first, *rest)
            finally:
                gate.set()
                await enc.stop()

    asyncio.run(main())
    assert counting.batches == [1, 9]


def test_follow_up_runs_in_the_encode_thread_and_fails_alone(model: Any) -> None:
    """``then`` (the search) runs on the encode's own pool thread for a query encoded alone
    (one thread hop per idle search); in a batch each gets its own ``then(row)`` on the pool,
    and a follow-up that raises fails only its caller."""
    gate = threading.Event()
    counting = _Counting(model, gate)
    threads: dict[str, int] = {}
    real = counting.embed_texts

    def embed(texts: list[str]) -> np.ndarray:
        threads.setdefault("encode", threading.get_ident())
        return real(texts)

    counting.embed_texts = embed  # type: ignore[method-assign]

    def follow(tag: str) -> Any:
        def then(row: np.ndarray) -> tuple[str, np.ndarray]:
            threads.setdefault(tag, threading.get_ident())
            if tag == "bad":
                raise ValueError("search failed")
            return tag, row

        return then

    async def main() -> tuple[Any, list[Any]]:
        with ThreadPoolExecutor(4) as pool:
            enc = QueryEncoder(counting, pool, max_batch=32, wait_ms=0)
            enc.start()
            try:
                first = asyncio.ensure_future(enc.encode_text("first", follow("first")))
                await asyncio.sleep(0.1)  # dispatched alone; held on the gate
                rest = [
                    asyncio.ensure_future(enc.encode_text(t, follow(t))) for t in ("a", "bad", "b")
                ]
                await asyncio.sleep(0.05)
                gate.set()
                return await first, await asyncio.gather(*rest, return_exceptions=True)
            finally:
                gate.set()
                await enc.stop()

    first, rest = asyncio.run(main())
    assert counting.batches == [1, 3]
    assert threads["first"] == threads["encode"]  # same thread: no second hop
    expected = model.embed_texts(["first", "a", "b"])
    assert first[0] == "first"
    np.testing.assert_allclose(first[1], expected[0], atol=1e-5)
    assert rest[0][0] == "a" and rest[2][0] == "b"
    np.testing.assert_allclose(rest[0][1], expected[1], atol=1e-5)
    np.testing.assert_allclose(rest[2][1], expected[2], atol=1e-5)
    assert isinstance(rest[1], ValueError) and "search failed" in str(rest[1])


def test_batch_cap_and_overload_and_errors(model: Any) -> None:
    gate = threading.Event()
    counting = _Counting(model, gate)

    async def main() -> None:
        with ThreadPoolExecutor(2) as pool:
            enc = QueryEncoder(counting, pool, max_batch=2, wait_ms=1, max_pending=2)
            enc.start()
            try:
                first = asyncio.ensure_future(enc.encode_text("held"))
                await asyncio.sleep(0.1)  # the collector took it and waits on the gate
                queued = [asyncio.ensure_future(enc.encode_text(f"q{i}")) for i in range(2)]
                await asyncio.sleep(0.05)
                with pytest.raises(Overloaded):
                    await enc.encode_text("one too many")
                gate.set()
                await asyncio.gather(first, *queued)
                assert max(counting.batches) <= 2
                with pytest.raises(RuntimeError, match="model failure"):
                    await enc.encode_text("boom")
                # the collector survives a failed batch
                assert (await enc.encode_text("after")).shape == (model.embed_dim,)
            finally:
                gate.set()
                await enc.stop()

    asyncio.run(main())


def test_openapi_documents_every_route(tmp_path: Path) -> None:
    spec = create_app(make_settings(tmp_path)).openapi()
    expected = {
        ("post", "/search"),
        ("post", "/ingest"),
        ("get", "/jobs/{job_id}"),
        ("get", "/items/{item_id}"),
        ("delete", "/items/{item_id}"),
        ("get", "/querybank"),
        ("post", "/querybank"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/limits"),
        ("get", "/jobs"),
        ("get", "/dead-letters"),
        ("post", "/dead-letters/requeue"),
        ("post", "/snapshots"),
        ("post", "/items/hashes"),
        ("get", "/items/{item_id}/thumbnail"),
        ("get", "/ui/config"),
    }
    found = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert found == expected
    for path, method in ((p, m) for m, p in expected):
        op = spec["paths"][path][method]
        assert op["description"] and "\n" not in op["description"].strip(), (method, path)
        ok = op["responses"].get("200") or op["responses"].get("202")
        assert ok is not None, (method, path)
    body = spec["paths"]["/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "text" in body["application/json"]["schema"]["properties"]
    assert spec["paths"]["/ingest"]["post"]["responses"]["413"]["content"]
    assert "ErrorResponse" in spec["components"]["schemas"]


def test_the_pool_searches_on_one_openmp_thread(tmp_path: Path) -> None:
    """index.search_threads applies on every pool thread (the OpenMP setting is per thread:
    the thread that set it is the only one that gets it)."""
    import faiss

    from index.vector_index import set_search_threads

    app = create_app(make_settings(tmp_path, model={"threads": 3}))
    pool = app.state.xmodal.executor
    seen = {pool.submit(lambda: (threading.get_ident(), faiss.omp_get_max_threads())).result()}
    assert {n for _, n in seen} == {1}
    with ThreadPoolExecutor(1) as other:  # a thread that did not set it keeps the default
        default = other.submit(faiss.omp_get_max_threads).result()
        set_search_threads(0)  # 0 leaves it alone
        assert other.submit(faiss.omp_get_max_threads).result() == default
    pool.shutdown()
