"""The ingestion worker end to end with the tiny model: real queues, galleries, Redis, media."""

from __future__ import annotations

import base64
import io
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from index.gallery import Gallery, GalleryConfig
from service.jobs import JobStore, LocalJobStore, RedisJobStore
from service.kinds import MODALITIES
from service.queue import IngestQueue, LocalQueue, RedisStreamQueue
from service.replication import ReplicaApplier, ReplicationPublisher
from service.settings import IngestSettings, Settings, WorkerSettings
from service.worker import BatchReport, GallerySink, Worker, start_embedded_worker


@pytest.fixture()
def media_root(tmp_path: Path, video_dir: Path, flickr_dir: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    shutil.copy(video_dir / "sample_demo_3.mp4", root / "clip.mp4")
    for p in sorted((flickr_dir / "images").glob("*.jpg"))[:3]:
        shutil.copy(p, root / p.name)
    return root


def make_settings(tmp_path: Path, media_root: Path | None, **worker: Any) -> Settings:
    knobs: dict[str, Any] = {
        "batch_size": 16,
        "batch_wait_ms": 10,
        "claim_idle_ms": 60_000,
        "max_deliveries": 2,
        "consumer": "w1",
    }
    knobs.update(worker)
    return Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(
            media_root=media_root, video_segment_seconds=2.0, video_frames_per_segment=2
        ),
        worker=WorkerSettings(**knobs),
        index=GalleryConfig(fsync=False, snapshot_every=0),
    )


def open_galleries(root: Path, model: Any) -> dict[str, Gallery]:
    cfg = GalleryConfig(fsync=False, snapshot_every=0)
    return {m: Gallery(root / m, model.embed_dim, model.num_vectors, cfg) for m in MODALITIES}


def b64_image(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def drain(worker: Worker, queue: IngestQueue, rounds: int = 20) -> list[BatchReport]:
    reports = []
    for _ in range(rounds):
        report = worker.run_once(block_ms=20)
        if report.read:
            reports.append(report)
        elif queue.depth() == 0 and queue.pending() == 0:
            break
    return reports


def mixed_items(media_root: Path) -> list[dict[str, Any]]:
    photo = sorted(media_root.glob("*.jpg"))[0]
    return [
        {"id": "t1", "modality": "text", "text": "a dog runs on the beach", "metadata": {"k": 1}},
        {"id": "t2", "modality": "text", "text": "  two children play football "},
        {"id": "red", "modality": "image", "data": b64_image((255, 0, 0))},
        {"id": "photo", "modality": "image", "path": photo.name, "metadata": {"src": "flickr"}},
        {"id": "clip", "modality": "video", "path": "clip.mp4"},
        {"id": "broken", "modality": "image", "data": b64_image((0, 0, 255))[:60]},
        {"id": "escape", "modality": "image", "path": "../../etc/passwd"},
        {"id": "empty", "modality": "text", "text": "   "},
    ]


@pytest.fixture(params=["local", "redis"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, model: Any
) -> Iterator[tuple[IngestQueue, JobStore, Any, dict[str, Gallery], ReplicaApplier | None]]:
    """(queue, jobs, sink, galleries, applier): embedded, or Redis with a replica applier."""
    galleries = open_galleries(tmp_path / "index", model)
    if request.param == "local":
        queue: IngestQueue = LocalQueue(tmp_path / "q.sqlite3")
        jobs: JobStore = LocalJobStore(tmp_path / "jobs.sqlite3")
        yield queue, jobs, GallerySink(galleries), galleries, None
    else:
        url = request.getfixturevalue("redis_url")
        queue = RedisStreamQueue(url, spill_bytes=256)
        jobs = RedisJobStore(url)
        publisher = ReplicationPublisher(url)
        applier = ReplicaApplier(url, galleries, snapshot_interval_s=0)
        yield queue, jobs, publisher, galleries, applier
        publisher.close()
        applier.close()
    queue.close()
    jobs.close()
    for g in galleries.values():
        g.close()


def test_ingests_texts_images_and_a_real_video(
    backend: Any, tmp_path: Path, media_root: Path, model: Any
) -> None:
    queue, jobs, sink, galleries, applier = backend
    settings = make_settings(tmp_path, media_root)
    worker = Worker(model, queue, jobs, sink, settings, record_metrics=True)
    items = mixed_items(media_root)
    jobs.create("job", [i["id"] for i in items])
    queue.enqueue("job", items)
    reports = drain(worker, queue)
    assert sum(r.indexed for r in reports) == 5 and sum(r.failed for r in reports) == 3
    assert len(reports) == 1  # one dynamic batch across modalities
    if applier is not None:
        applier.catch_up()

    status = jobs.get("job")
    assert status is not None and status.state == "done"
    states = {i.id: (i.state, i.error) for i in status.items}
    assert {k for k, (s, _) in states.items() if s == "indexed"} == {
        "t1",
        "t2",
        "red",
        "photo",
        "clip",
    }
    assert "corrupt" in (states["broken"][1] or "") or "truncated" in (states["broken"][1] or "")
    assert "outside the media root" in (states["escape"][1] or "")
    assert "empty" in (states["empty"][1] or "")

    assert sorted(galleries["text"].ids()) == ["t1", "t2"]
    assert sorted(galleries["image"].ids()) == ["photo", "red"]
    clip = galleries["video"].get("clip")
    assert clip is not None and clip.segments is not None
    assert clip.vectors.shape == (len(clip.segments), model.embed_dim)
    assert clip.segments[0] == (0.0, 2.0) and clip.segments[-1][1] == pytest.approx(6.089, abs=0.01)
    assert galleries["image"].get("photo").metadata == {"src": "flickr"}  # type: ignore[union-attr]

    # what was indexed is what the model says about that content
    expect = model.embed_texts(["a dog runs on the beach"])[0]
    np.testing.assert_allclose(galleries["text"].get("t1").vectors[0], expect, atol=1e-5)  # type: ignore[union-attr]
    hits = galleries["image"].search(galleries["image"].get("red").vectors[None, 0], k=1)  # type: ignore[union-attr]
    assert hits[0][0].id == "red"

    # idempotent: the same content again is skipped without encoding; new content replaces
    version = galleries["image"].version
    jobs.create("again", ["red", "t1"])
    queue.enqueue(
        "again",
        [
            {"id": "red", "modality": "image", "data": b64_image((255, 0, 0))},
            {"id": "t1", "modality": "text", "text": "a cat sleeps"},
        ],
    )
    [report] = drain(worker, queue)
    assert (report.unchanged, report.indexed) == (1, 1)
    if applier is not None:
        applier.catch_up()
    assert galleries["image"].version == version
    np.testing.assert_allclose(
        galleries["text"].get("t1").vectors[0],
        model.embed_texts(["a cat sleeps"])[0],
        atol=1e-5,  # type: ignore[union-attr]
    )
    assert jobs.get("again").state == "done"  # type: ignore[union-attr]
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}


class FlakyModel:
    """The tiny model, except that texts containing "poison" always fail to encode."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if any("poison" in t for t in texts):
            raise RuntimeError("kernel exploded")
        return self.model.embed_texts(texts)


def test_poison_item_is_dead_lettered_without_blocking_others(
    backend: Any, tmp_path: Path, model: Any
) -> None:
    queue, jobs, sink, galleries, applier = backend
    settings = make_settings(tmp_path, None, claim_idle_ms=1, max_deliveries=2)
    worker = Worker(FlakyModel(model), queue, jobs, sink, settings)
    items = [
        {"id": "ok1", "modality": "text", "text": "fine"},
        {"id": "bad", "modality": "text", "text": "poison pill"},
        {"id": "ok2", "modality": "text", "text": "also fine"},
    ]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    first = worker.run_once(block_ms=10)
    assert (first.indexed, first.retried) == (2, 1)  # batch-mates went through at once
    status = jobs.get("j")
    assert status is not None and status.state == "running"
    time.sleep(0.01)
    reports = drain(worker, queue)
    assert sum(r.dead_lettered for r in reports) == 1
    status = jobs.get("j")
    assert status is not None and status.state == "done"
    bad = next(i for i in status.items if i.id == "bad")
    assert bad.state == "failed" and "kernel exploded" in (bad.error or "")
    assert "2 deliveries" in (bad.error or "")
    [dead] = queue.list_dead_letters()
    assert dead.item["id"] == "bad" and "kernel exploded" in dead.error
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 1}
    if applier is not None:
        applier.catch_up()
    assert sorted(galleries["text"].ids()) == ["ok1", "ok2"]


def test_crashed_workers_messages_are_reclaimed(redis_url: str, tmp_path: Path, model: Any) -> None:
    queue = RedisStreamQueue(redis_url)
    jobs = RedisJobStore(redis_url)
    galleries = open_galleries(tmp_path / "index", model)
    publisher = ReplicationPublisher(redis_url)
    items = [{"id": f"t{i}", "modality": "text", "text": f"caption {i}"} for i in range(6)]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    # worker A takes everything and dies without acking
    taken = queue.read("worker-a", count=10, block_ms=0)
    assert len(taken) == 6 and queue.pending() == 6 and queue.depth() == 0
    settings = make_settings(tmp_path, None, claim_idle_ms=1, consumer="worker-b")
    time.sleep(0.01)
    worker_b = Worker(model, queue, jobs, publisher, settings)
    reports = drain(worker_b, queue)
    assert sum(r.indexed for r in reports) == 6
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    assert jobs.get("j").state == "done"  # type: ignore[union-attr]
    ReplicaApplier(redis_url, galleries).catch_up()
    assert len(galleries["text"]) == 6
    publisher.close()
    for g in galleries.values():
        g.close()


def test_a_crash_loop_item_is_dead_lettered(redis_url: str, tmp_path: Path, model: Any) -> None:
    """An item that kills every worker that tries it alone (no error recorded) still ends."""
    queue = RedisStreamQueue(redis_url)
    jobs = RedisJobStore(redis_url)
    jobs.create("j", ["x"])
    queue.enqueue("j", [{"id": "x", "modality": "text", "text": "segfault"}])
    queue.read("a", 1)  # a dies with it in a batch: not pinned on the item yet
    for crashed in ("b", "c"):  # then it kills each worker that tries it alone
        [m] = queue.reclaim(crashed, 0, 1)
        assert queue.mark_solo(m) == m.solo
    settings = make_settings(tmp_path, None, claim_idle_ms=1, max_deliveries=2, consumer="d")
    time.sleep(0.01)
    report = Worker(model, queue, jobs, ReplicationPublisher(redis_url), settings).run_once(10)
    assert report.dead_lettered == 1
    [item] = jobs.get("j").items  # type: ignore[union-attr]
    assert item.state == "failed" and "crashed while processing it alone" in (item.error or "")
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 1}


def test_batch_mates_of_crashes_are_not_dead_lettered(
    backend: Any, tmp_path: Path, model: Any
) -> None:
    """Three crashes during the same batch: its items are retried one by one and indexed,
    none dead-lettered (issue #15 item 6)."""
    queue, jobs, sink, galleries, applier = backend
    items = [{"id": f"m{i}", "modality": "text", "text": f"caption {i}"} for i in range(5)]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    assert len(queue.read("crash-1", 10)) == 5
    for crashed in ("crash-2", "crash-3"):
        assert len(queue.reclaim(crashed, 0, 10)) == 5
    settings = make_settings(tmp_path, None, claim_idle_ms=1, max_deliveries=2)
    time.sleep(0.01)
    reports = drain(Worker(model, queue, jobs, sink, settings), queue)
    assert sum(r.dead_lettered for r in reports) == 0
    assert sum(r.indexed for r in reports) == 5
    status = jobs.get("j")
    assert status is not None and status.state == "done"
    assert all(it.state == "indexed" for it in status.items)
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    if applier is not None:
        applier.catch_up()
    assert sorted(galleries["text"].ids()) == [f"m{i}" for i in range(5)]


def test_two_workers_share_the_queue(redis_url: str, tmp_path: Path, model: Any) -> None:
    queue = RedisStreamQueue(redis_url)
    jobs = RedisJobStore(redis_url)
    publisher = ReplicationPublisher(redis_url)
    items = [{"id": f"t{i}", "modality": "text", "text": f"caption {i}"} for i in range(20)]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    w1 = Worker(
        model, queue, jobs, publisher, make_settings(tmp_path, None, batch_size=4), consumer="a"
    )
    w2 = Worker(
        model, queue, jobs, publisher, make_settings(tmp_path, None, batch_size=4), consumer="b"
    )
    counts = {"a": 0, "b": 0}
    for _ in range(10):
        counts["a"] += w1.run_once(block_ms=10).indexed
        counts["b"] += w2.run_once(block_ms=10).indexed
    assert counts["a"] + counts["b"] == 20 and counts["a"] > 0 and counts["b"] > 0
    assert jobs.get("j").state == "done"  # type: ignore[union-attr]


def test_embedded_worker_runs_in_background_and_stops(tmp_path: Path, model: Any) -> None:
    settings = make_settings(tmp_path, None)
    galleries = open_galleries(tmp_path / "index", model)
    queue = LocalQueue(tmp_path / "q.sqlite3")
    jobs = LocalJobStore(tmp_path / "jobs.sqlite3")
    runner = start_embedded_worker(settings, model, galleries, queue, jobs)
    try:
        items = [{"id": f"t{i}", "modality": "text", "text": f"caption {i}"} for i in range(5)]
        jobs.create("j", [i["id"] for i in items])
        queue.enqueue("j", items)
        deadline = time.monotonic() + 10
        while jobs.get("j").state != "done" and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert jobs.get("j").state == "done"  # type: ignore[union-attr]
        assert len(galleries["text"]) == 5
    finally:
        t0 = time.monotonic()
        assert runner.stop(timeout=5)
        assert time.monotonic() - t0 < 3
    assert not runner.alive
    queue.close()
    jobs.close()


def test_worker_command_needs_redis_and_applies_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.commands import worker as command

    monkeypatch.delenv("XMODAL_REDIS_URL", raising=False)
    assert command.main([]) == 2
    assert "XMODAL_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("XMODAL_REDIS_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("XMODAL_WORKER__BATCH_SIZE", "7")
    settings = command.load_settings(command.parse_args(["--consumer", "gpu-0", "--device", "cpu"]))
    assert settings.worker.consumer == "gpu-0" and settings.worker.batch_size == 7
    assert settings.model.device == "cpu" and settings.redis_url.endswith("/15")
    assert command.main(["--batch-size", "0"]) == 2  # invalid settings: a clear error, not a trace


def test_set_model_and_bad_videos(tmp_path: Path, media_root: Path, video_dir: Path) -> None:
    """A set-embedding model stores K slot vectors per item (one set per clip); a broken
    video fails alone; videos are decoded in chunks under the frame budget."""
    from models.factory import get_model_config
    from models.model import XModal

    cfg = get_model_config("tiny-random")
    cfg = cfg.model_copy(
        update={
            "name": "tiny-set",
            "head": cfg.head.model_copy(update={"pooling": "set"}),
            "similarity": cfg.similarity.model_copy(update={"kind": "smooth_chamfer"}),
        }
    )
    set_model = XModal(cfg, pretrained=False).eval()
    galleries = open_galleries(tmp_path / "index", set_model)
    queue = LocalQueue(tmp_path / "q.sqlite3")
    jobs = LocalJobStore(tmp_path / "jobs.sqlite3")
    raw = (video_dir / "sample_demo_9.mp4").read_bytes()
    items = [
        {"id": "clip", "modality": "video", "path": "clip.mp4"},
        {"id": "clip2", "modality": "video", "data": base64.b64encode(raw).decode()},
        {"id": "cut", "modality": "video", "data": base64.b64encode(raw[: len(raw) // 3]).decode()},
        {"id": "img", "modality": "image", "data": b64_image((0, 255, 0))},
        {"id": "txt", "modality": "text", "text": "people dancing"},
    ]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    settings = make_settings(tmp_path, media_root)
    settings.worker.video_frame_budget = 8  # each clip needs 6-10 frames: one clip per chunk
    worker = Worker(set_model, queue, jobs, GallerySink(galleries), settings)
    try:
        drain(worker, queue)
    finally:
        worker.close()
    status = {i.id: i for i in jobs.get("j").items}  # type: ignore[union-attr]
    assert status["cut"].state == "failed" and status["cut"].error
    assert all(status[i].state == "indexed" for i in ("clip", "clip2", "img", "txt"))
    for modality, item_id in (
        ("video", "clip"),
        ("video", "clip2"),
        ("image", "img"),
        ("text", "txt"),
    ):
        rec = galleries[modality].get(item_id)
        assert rec is not None and rec.vectors.shape == (4, 64) and rec.segments is None
    queue.close()
    jobs.close()


class SlowModel(FlakyModel):
    """Encoding takes a while: long enough to ask the worker to stop mid-batch."""

    def __init__(self, model: Any, started: Any) -> None:
        super().__init__(model)
        self.started = started

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self.started.set()
        time.sleep(0.5)
        return self.model.embed_texts(texts)


def test_stop_finishes_the_in_flight_batch(tmp_path: Path, model: Any) -> None:
    import threading

    started = threading.Event()
    settings = make_settings(tmp_path, None)
    galleries = open_galleries(tmp_path / "index", model)
    queue = LocalQueue(tmp_path / "q.sqlite3")
    jobs = LocalJobStore(tmp_path / "jobs.sqlite3")
    runner = start_embedded_worker(settings, SlowModel(model, started), galleries, queue, jobs)
    items = [{"id": f"t{i}", "modality": "text", "text": f"caption {i}"} for i in range(4)]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    assert started.wait(10)
    assert runner.stop(timeout=10)  # asked mid-encode: returns once the batch is written
    assert jobs.get("j").state == "done"  # type: ignore[union-attr]
    assert len(galleries["text"]) == 4 and queue.stats()["pending"] == 0
    queue.close()
    jobs.close()
