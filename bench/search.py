"""What the service adds to its parts: `POST /search` over HTTP against the bare encode + search.

    python bench/search.py --gallery 10000 --json
    python bench/search.py --gallery 100000 --json

One run: a gallery of ``--gallery`` synthetic unit vectors of the model's dimension is bulk
loaded in this process (``Gallery.upsert`` in chunks of 10k, no fsync, then a snapshot: the
index is built once, by the ``auto`` factory the service uses) into a temporary data dir; a
real ``xmodal serve`` (embedded mode, the shipped model, its default engine) opens that
snapshot; text queries are real Flickr8k dev captions. The same captions are then timed in
this process as the bare parts: the query encode (the serving model's ``embed_texts``, same
engine, same thread count) plus ``Gallery.search`` on the same gallery, with FAISS on the
OpenMP threads the service gives a search (``index.search_threads``). ``overhead`` is
``service_p50 / bare_p50 - 1`` (target <= 0.15). Service and bare alternate query by query
(``--rounds`` passes over the captions) so machine noise hits both alike; the service side
is timed with ``http.client`` on one keep-alive connection. QPS at concurrency 1, 8 and 32:
that many requests in flight from one asyncio client (keep-alive connections), over the same
captions. ``service_cpu_ms_per_search``: the server process's CPU time (all threads) over the
timed searches, per search; unlike the wall clock it does not hide a core that spins idle.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from served import FLICKR, Server, captions, cpu_seconds, emit  # noqa: E402

from index.gallery import Gallery, GalleryConfig, Record  # noqa: E402
from index.vector_index import set_search_threads  # noqa: E402
from service.loading import load_serving_model  # noqa: E402
from service.settings import ModelSettings  # noqa: E402


def build_gallery(root: Path, model_name: str, dim: int, n: int, seed: int = 0) -> Gallery:
    """``n`` random unit vectors as image items ``img-<i>`` in the service's gallery folder."""
    rng = np.random.default_rng(seed)
    gallery = Gallery(root / "index" / model_name / "image", dim, 1, GalleryConfig(fsync=False))
    for start in range(0, n, 10_000):
        x = rng.standard_normal((min(10_000, n - start), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        gallery.upsert(Record(f"img-{start + i}", v) for i, v in enumerate(x))
    gallery.snapshot()
    return gallery


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def body(q: str, top_k: int) -> dict[str, Any]:
    return {"text": q, "targets": ["image"], "top_k": top_k, "qbnorm": False}


class HttpSearch:
    """Sequential searches on one keep-alive connection, each timed from sending the request
    to the last byte of the answer. ``http.client``, the lightest client at hand (httpx adds
    about half a millisecond of its own per request), so the time is the service's."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def __call__(self, q: str, top_k: int) -> float:
        payload = json.dumps(body(q, top_k))
        t0 = time.perf_counter()
        self.conn.request("POST", "/search", payload, {"content-type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        seconds = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"/search answered {r.status}: {data[:200]!r}")
        return seconds

    def close(self) -> None:
        self.conn.close()


def bare_search(model: Any, gallery: Gallery, q: str, top_k: int) -> float:
    """The parts alone: encode the caption, search the gallery."""
    t0 = time.perf_counter()
    v = model.embed_texts([q])
    gallery.search(v, top_k)
    return time.perf_counter() - t0


def paired(
    url: str, model: Any, gallery: Gallery, queries: list[str], top_k: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Service and bare latencies, the two sides alternating query by query (who goes first
    alternating too), so load that comes and goes on a shared machine hits both alike."""
    client = HttpSearch(url)
    service: list[float] = []
    bare: list[float] = []
    try:
        for r in range(rounds):
            for i, q in enumerate(queries):
                if (i + r) % 2 == 0:
                    service.append(client(q, top_k))
                    bare.append(bare_search(model, gallery, q, top_k))
                else:
                    bare.append(bare_search(model, gallery, q, top_k))
                    service.append(client(q, top_k))
    finally:
        client.close()
    return service, bare


async def _qps(url: str, queries: list[str], concurrency: int, top_k: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    todo = list(queries)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client() -> None:
            while todo:
                r = await client.post("/search", json=body(todo.pop(), top_k))
                r.raise_for_status()

        await asyncio.gather(*(client.post("/search", json=body(q, top_k)) for q in queries[:4]))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return len(queries) / (time.perf_counter() - t0)


def qps(url: str, queries: list[str], concurrency: int, top_k: int) -> float:
    """Requests per second with ``concurrency`` requests in flight."""
    return asyncio.run(_qps(url, queries, concurrency, top_k))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qps-queries", type=int, default=200, help="requests per QPS level")
    p.add_argument("--data", type=Path, default=FLICKR)
    p.add_argument(
        "--serve-from",
        type=Path,
        action="append",
        help="checkout whose `xmodal serve` runs (default: this one); give it twice (e.g. an "
        "older commit's export, then this one) for a before/after on one gallery in one run: "
        "one JSON line each",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    set_search_threads(GalleryConfig().search_threads)  # as on the service's pool threads
    model = load_serving_model(ModelSettings(device="cpu"))
    queries = captions(args.data, args.queries)
    checkouts: list[Path] = args.serve_from or [REPO]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        gallery = build_gallery(root / "built", model.name, model.embed_dim, args.gallery)
        build_s = time.perf_counter() - t0
        for i, checkout in enumerate(checkouts):
            data_dir = root / f"serve-{i}"  # a fresh copy of the built gallery per server
            shutil.copytree(root / "built" / "index", data_dir / "index")
            env = {"PYTHONPATH": str(checkout)}
            with Server(data_dir, args.threads, env=env, cwd=checkout) as server:
                paired(server.url, model, gallery, queries[:20], args.top_k, 1)  # warm-up
                cpu0 = cpu_seconds(server.pid)
                service, bare = paired(server.url, model, gallery, queries, args.top_k, args.rounds)
                time.sleep(0.2)  # what the server still burns after its last answer counts too
                server_cpu = cpu_seconds(server.pid) - cpu0
                many = (queries * (1 + args.qps_queries // len(queries)))[: args.qps_queries]
                rates = {c: qps(server.url, many, c, args.top_k) for c in (1, 8, 32)}
            out = {
                "gallery": args.gallery,
                "index": gallery.factory,
                "model": model.name,
                "engine": "onnx" if model.runtime is not None else "eager",
                "threads": args.threads,
                "queries": len(service),
                "service_p50_ms": round(pct(service, 50), 2),
                "service_p99_ms": round(pct(service, 99), 2),
                "bare_p50_ms": round(pct(bare, 50), 2),
                "bare_p99_ms": round(pct(bare, 99), 2),
                "overhead": round(pct(service, 50) / pct(bare, 50) - 1, 3),
                "service_cpu_ms_per_search": round(server_cpu / len(service) * 1000, 1),
                "qps_c1": round(rates[1], 1),
                "qps_c8": round(rates[8], 1),
                "qps_c32": round(rates[32], 1),
                "gallery_build_s": round(build_s, 1),
            }
            emit(out, args.json, checkout if args.serve_from else None)
        gallery.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
