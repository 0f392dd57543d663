"""Soak (issue #15): mixed search and ingest at concurrency 32 on loopback for 10 minutes.

Starts ``xmodal serve`` (embedded mode, ``tiny-random`` model so the service, not the encoder,
is what is measured), seeds the index, then runs ``--concurrency`` clients: each request is a
text search (90%) or a one-item text ingest (10%). Reports errors, p50/p99 latency, QPS, and
the server's RSS every ``--sample-s`` seconds; whether RSS plateaus is judged on the second
half of the run (slope in MB/min). Writes JSON and, when matplotlib is there, an RSS plot.

    python bench/soak.py                        # 600 s, c32
    python bench/soak.py --seconds 60 --json /tmp/soak.json --plot docs/soak-rss.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORDS = ("dog", "cat", "beach", "surf", "wave", "market", "train")
WORDS += ("bridge", "child", "ball", "red", "blue", "snow", "grass")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


async def _client(
    url: str, deadline: float, seed: int, ingest_share: float, out: dict[str, Any]
) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            t0 = time.perf_counter()
            kind = "ingest" if rng.random() < ingest_share else "search"
            try:
                if kind == "search":
                    body = {"text": _caption(rng), "top_k": 10, "targets": ["text"]}
                    r = await client.post("/search", json=body)
                else:
                    item = {"id": f"s{seed}-{n}", "modality": "text", "text": _caption(rng)}
                    r = await client.post("/ingest", json={"items": [item]})
                ok = r.status_code in (200, 202)
            except httpx.HTTPError:
                ok = False
            out["latency"][kind].append(time.perf_counter() - t0)
            if not ok:
                out["errors"] += 1


async def _load(url: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": {"search": [], "ingest": []}, "errors": 0, "rss": []}
    start = time.monotonic()
    deadline = start + args.seconds

    async def sample() -> None:
        while time.monotonic() < deadline:
            out["rss"].append((round(time.monotonic() - start, 1), round(_rss_mb(pid), 1)))
            await asyncio.sleep(args.sample_s)

    tasks = [
        _client(url, deadline, seed, args.ingest_share, out) for seed in range(args.concurrency)
    ]
    await asyncio.gather(sample(), *tasks)
    out["wall_s"] = time.monotonic() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--ingest-share", type=float, default=0.1)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--seed-items", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="xmodal-soak-"))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        XMODAL_MODEL__NAME="tiny-random",
        XMODAL_DATA_DIR=str(work),
        XMODAL_PORT=str(port),
        XMODAL_LOG_LEVEL="WARNING",
    )
    log = (work / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"], env=env, cwd=REPO, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {work / 'serve.log'}")
            time.sleep(0.2)
        rng = random.Random(0)
        with httpx.Client(base_url=url, timeout=60) as client:
            for start in range(0, args.seed_items, 200):
                items = [
                    {"id": f"seed{i}", "modality": "text", "text": _caption(rng)}
                    for i in range(start, min(start + 200, args.seed_items))
                ]
                client.post("/ingest", json={"items": items}).raise_for_status()
        rss_before = _rss_mb(proc.pid)
        out = asyncio.run(_load(url, args, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    lat = {k: np.array(v) * 1000 for k, v in out["latency"].items()}
    requests = sum(len(v) for v in lat.values())
    rss = out["rss"]
    half = [(t, m) for t, m in rss if t >= args.seconds / 2]
    slope = (
        float(np.polyfit([t for t, _ in half], [m for _, m in half], 1)[0]) * 60
        if len(half) >= 3
        else float("nan")
    )
    result = {
        "seconds": round(out["wall_s"], 1),
        "concurrency": args.concurrency,
        "requests": requests,
        "errors": out["errors"],
        "qps": round(requests / out["wall_s"], 1),
        "search_p50_ms": round(float(np.percentile(lat["search"], 50)), 1),
        "search_p99_ms": round(float(np.percentile(lat["search"], 99)), 1),
        "ingest_p50_ms": round(float(np.percentile(lat["ingest"], 50)), 1)
        if len(lat["ingest"])
        else None,
        "ingest_p99_ms": round(float(np.percentile(lat["ingest"], 99)), 1)
        if len(lat["ingest"])
        else None,
        "rss_before_load_mb": round(rss_before, 1),
        "rss_first_mb": rss[0][1] if rss else None,
        "rss_last_mb": rss[-1][1] if rss else None,
        "rss_max_mb": max(m for _, m in rss) if rss else None,
        "rss_slope_second_half_mb_per_min": round(slope, 2),
        "rss": rss,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
        else:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.plot([t for t, _ in rss], [m for _, m in rss])
            share = round(100 * args.ingest_share)
            ax.set_xlabel(f"seconds under load (c{args.concurrency}, {share}% ingest)")
            ax.set_ylabel("server RSS (MB)")
            ax.set_title(f"soak: {result['qps']} QPS, {result['errors']} errors")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=110)
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
