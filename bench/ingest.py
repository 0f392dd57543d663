"""Ingest throughput end to end (`POST /ingest` -> searchable) against the bare fast encoder.

    python bench/ingest.py --json

One run: a real ``xmodal serve`` (embedded defaults: in-process worker, SQLite queue, fsync'd
WAL, thumbnails on; a temporary data dir; the shipped model on its default engine) ingests real
Flickr8k dev photos, POSTed as base64 in batches of ``--post-batch``; the clock runs from the
first POST until every job reports all its items ``indexed`` (embedded mode marks an item
indexed only once it is in the gallery, i.e. searchable; the last item of each round is also
fetched from ``GET /items/{id}``). In the same run, this process times the bare encoder on the
same photos: the same model and engine, the same thread count, decode + resize + encode
(``media.load_image`` + ``model.embed_images`` in batches of the worker's batch size), nothing
else. ``ratio`` = service / bare (target >= 0.85). Videos: the clips of ``shared/data/video``
(``--video-copies`` copies under distinct ids), frames/s = sampled frames encoded per second,
bare = ``media.load_video`` + ``model.embed_segments``. Service and bare runs alternate in
``--rounds`` rounds (who goes first rotates); the medians are reported. ``--serve-from`` twice
(an older checkout, then this one) runs both servers side by side for a before/after in one
run: one JSON line per server, each against the same bare runs. Beside the wall clock, each
side's CPU time per photo (the server process; this process for the bare loop), which a
loaded machine moves much less than it moves the wall clock.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from served import FLICKR, REPO, VIDEOS, Server, cpu_seconds, dev_rows, emit  # noqa: E402

from service import media  # noqa: E402
from service.loading import load_serving_model  # noqa: E402
from service.settings import IngestSettings, ModelSettings, WorkerSettings  # noqa: E402


def ingest(url: str, items: list[dict[str, Any]], post_batch: int) -> float:
    """POST ``items`` in batches, poll until every job is done; seconds taken. Raises if an
    item failed or the last one is not searchable."""
    import httpx

    # the request bodies are serialised before the clock starts: the client's own JSON work
    # (several MB per POST, on the same 2 cores) is not the service's
    bodies = [
        json.dumps({"items": items[i : i + post_batch]}).encode()
        for i in range(0, len(items), post_batch)
    ]
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        jobs = []
        for payload in bodies:
            r = client.post("/ingest", content=payload, headers=headers)
            r.raise_for_status()
            jobs.append(r.json()["job_id"])
        for job in jobs:
            while True:
                status = client.get(f"/jobs/{job}").json()
                if status["state"] in ("done", "failed"):
                    break
                time.sleep(0.05)
            bad = [it for it in status["items"] if it["state"] != "indexed"]
            if bad:
                raise RuntimeError(f"job {job}: {len(bad)} items not indexed, e.g. {bad[0]}")
        seconds = time.perf_counter() - t0
        client.get(f"/items/{items[-1]['id']}").raise_for_status()  # searchable
    return seconds


def bare_images(model: Any, raws: list[bytes], batch: int, settings: IngestSettings) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(raws), batch):
        images = [media.load_image(r, settings) for r in raws[i : i + batch]]
        model.embed_images(images, batch_size=batch)
    return time.perf_counter() - t0


def bare_videos(model: Any, raws: list[bytes], settings: IngestSettings) -> tuple[float, int]:
    t0 = time.perf_counter()
    segments = [s.frames for r in raws for s in media.load_video(r, settings).segments]
    model.embed_segments(segments)
    return time.perf_counter() - t0, sum(len(s) for s in segments)


def per_image_ms(seconds: list[float], n: int) -> float:
    return round(statistics.median(seconds) / n * 1000, 2)


def items_of(kind: str, raws: list[bytes], prefix: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "modality": kind, "data": base64.b64encode(r).decode()}
        for i, r in enumerate(raws)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=400)
    p.add_argument("--post-batch", type=int, default=50, help="items per POST /ingest")
    p.add_argument("--video-copies", type=int, default=2, help="copies of each clip")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=FLICKR)
    p.add_argument("--videos", type=Path, default=VIDEOS)
    p.add_argument(
        "--serve-from",
        type=Path,
        action="append",
        help="checkout whose `xmodal serve` runs (default: this one); give it twice (e.g. an "
        "older commit's export, then this one) for a before/after in one run: the servers run "
        "side by side, every round times each of them and the bare encoder in turn, and each "
        "server gets a JSON line of its own against the same bare runs",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    model = load_serving_model(ModelSettings(device="cpu"))  # exports the graphs if needed
    settings = IngestSettings()
    batch = WorkerSettings().batch_size
    rows = dev_rows(args.data)
    photos = [(args.data / "images" / r["image"]).read_bytes() for r in rows[: args.photos]]
    warm = [(args.data / "images" / r["image"]).read_bytes() for r in rows[-batch:]]
    clips = sorted(args.videos.glob("*.mp4")) if args.videos.is_dir() else []
    videos = [c.read_bytes() for c in clips] * args.video_copies
    checkouts: list[Path] = args.serve_from or [REPO]

    sides = list(range(len(checkouts) + 1))  # 0: the bare encoder, i + 1: server i
    image_s: dict[int, list[float]] = {side: [] for side in sides}
    image_cpu: dict[int, list[float]] = {side: [] for side in sides}
    video_s: dict[int, list[float]] = {side: [] for side in sides}
    frames = 0
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                Server(
                    Path(tmp) / f"data-{i}",
                    args.threads,
                    env={"PYTHONPATH": str(checkout)},
                    cwd=checkout,
                )
            )
            for i, checkout in enumerate(checkouts)
        ]
        for server in servers:
            ingest(server.url, items_of("image", warm, "warm"), args.post_batch)  # first batch
        bare_images(model, warm, batch, settings)
        for r in range(args.rounds):
            order = sides[r % len(sides) :] + sides[: r % len(sides)]  # rotate who goes first
            for side in order:
                pid = None if side == 0 else servers[side - 1].pid
                cpu0 = cpu_seconds(pid)
                if side == 0:
                    image_s[0].append(bare_images(model, photos, batch, settings))
                else:
                    items = items_of("image", photos, f"r{r}")
                    image_s[side].append(ingest(servers[side - 1].url, items, args.post_batch))
                image_cpu[side].append(cpu_seconds(pid) - cpu0)
            if videos:
                for side in order:
                    if side == 0:
                        seconds, frames = bare_videos(model, videos, settings)
                        video_s[0].append(seconds)
                    else:
                        items = items_of("video", videos, f"v{r}")
                        video_s[side].append(ingest(servers[side - 1].url, items, len(clips)))

    bare_ips = len(photos) / statistics.median(image_s[0])
    for i, checkout in enumerate(checkouts):
        service_ips = len(photos) / statistics.median(image_s[i + 1])
        out: dict[str, Any] = {
            "photos": len(photos),
            "rounds": args.rounds,
            "engine": "onnx" if model.runtime is not None else "eager",
            "threads": args.threads,
            "worker_batch": batch,
            "service_images_per_s": round(service_ips, 2),
            "bare_images_per_s": round(bare_ips, 2),
            "ratio": round(service_ips / bare_ips, 3),
            "service_image_s": [round(s, 2) for s in image_s[i + 1]],
            "bare_image_s": [round(s, 2) for s in image_s[0]],
            # CPU ms per photo (server process / bench process), medians over the rounds
            "service_cpu_ms_per_image": per_image_ms(image_cpu[i + 1], len(photos)),
            "bare_cpu_ms_per_image": per_image_ms(image_cpu[0], len(photos)),
        }
        if videos:
            service_fps = frames / statistics.median(video_s[i + 1])
            bare_fps = frames / statistics.median(video_s[0])
            out.update(
                {
                    "videos": len(videos),
                    "frames": frames,
                    "service_frames_per_s": round(service_fps, 2),
                    "bare_frames_per_s": round(bare_fps, 2),
                    "video_ratio": round(service_fps / bare_fps, 3),
                    "service_video_s": [round(s, 2) for s in video_s[i + 1]],
                    "bare_video_s": [round(s, 2) for s in video_s[0]],
                }
            )
        emit(out, args.json, checkout if args.serve_from else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
