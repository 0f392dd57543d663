"""What the service adds to its parts: `POST /search` over HTTP against the bare encode + search.

    python bench/search.py --gallery 10000 --json
    python bench/search.py --gallery 100000 --json

One run: a gallery of ``--gallery`` synthetic unit vectors of the model's dimension is written
into a temporary data dir; a real ``xmodal serve`` (embedded mode, the shipped model, its
default engine) opens it; text queries are real Flickr8k captions. The same captions are then
timed in this process as the bare parts: the query encode (the serving model's
``embed_texts``, same engine) plus ``Gallery.search`` on the same gallery. ``overhead`` is
``service_p50 / bare_p50 - 1`` (target <= 0.15). QPS is measured at concurrency 1, 8 and 32
(one keep-alive HTTP client per thread). Service and bare runs are interleaved in rounds so
machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from index.gallery import Gallery, GalleryConfig, Record  # noqa: E402
from service.loading import load_serving_model  # noqa: E402
from service.settings import ModelSettings  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def captions(data: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    rows = [r for r in rows if r.get("split") == "dev"] or rows
    return [r["captions"][0] for r in rows[:n]]


def build_gallery(root: Path, model_name: str, dim: int, n: int, seed: int = 0) -> Gallery:
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


def serve(data_dir: Path, port: int, threads: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, XMODAL_DATA_DIR=str(data_dir), XMODAL_PORT=str(port))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    log = open(data_dir / "serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xmodal serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("xmodal serve did not become ready")


def http_latencies(url: str, queries: list[str], top_k: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for q in queries:
            body = {"text": q, "targets": ["image"], "top_k": top_k, "qbnorm": False}
            t0 = time.perf_counter()
            r = client.post("/search", json=body)
            out.append(time.perf_counter() - t0)
            r.raise_for_status()
    return out


def bare_latencies(model: Any, gallery: Gallery, queries: list[str], top_k: int) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        v = model.embed_texts([q])
        gallery.search(v, top_k)
        out.append(time.perf_counter() - t0)
    return out


def qps(url: str, queries: list[str], concurrency: int, top_k: int) -> float:
    per = [queries[i::concurrency] for i in range(concurrency)]
    threads = [
        threading.Thread(target=http_latencies, args=(url, part, top_k)) for part in per if part
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(queries) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model = load_serving_model(ModelSettings(device="cpu"))
    queries = captions(args.data, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gallery = build_gallery(root, model.name, model.embed_dim, args.gallery)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = serve(root, port, args.threads)
        try:
            wait_ready(url, proc)
            http_latencies(url, queries[:20], args.top_k)  # warm up both sides
            bare_latencies(model, gallery, queries[:20], args.top_k)
            service: list[float] = []
            bare: list[float] = []
            for _ in range(args.rounds):
                service += http_latencies(url, queries, args.top_k)
                bare += bare_latencies(model, gallery, queries, args.top_k)
            rates = {c: qps(url, queries, c, args.top_k) for c in (1, 8, 32)}
        finally:
            proc.terminate()
            proc.wait(30)
            gallery.close()
    out = {
        "gallery": args.gallery,
        "index": gallery.factory,
        "model": model.name,
        "engine": "onnx" if model.runtime is not None else "eager",
        "queries": len(service),
        "service_p50_ms": round(pct(service, 50), 2),
        "service_p99_ms": round(pct(service, 99), 2),
        "bare_p50_ms": round(pct(bare, 50), 2),
        "bare_p99_ms": round(pct(bare, 99), 2),
        "overhead": round(pct(service, 50) / pct(bare, 50) - 1, 3),
        "qps_c1": round(rates[1], 1),
        "qps_c8": round(rates[8], 1),
        "qps_c32": round(rates[32], 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>16s}  {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
