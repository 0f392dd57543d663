"""Decode-ahead in the worker: the next batch decodes while one encodes (real queues: SQLite and
Redis), failures stay with their item, stop() finishes the prefetched batch, and fitting ahead
changes nothing the model computes."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service import media
from service.thumbnails import FileThumbnailStore
from service.worker import Worker
from tests.service.test_worker import (  # noqa: F401 - fixtures
    b64_image,
    backend,
    make_settings,
    open_galleries,
)

WAIT_S = 20.0  # a guard against hangs, not a timing assert


class GateModel:
    """The tiny model; the first encode call runs ``on_first`` before encoding."""

    def __init__(self, model: Any, on_first: Any) -> None:
        self.model = model
        self.on_first = on_first
        self.first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def _gate(self) -> None:
        if self.first:
            self.first = False
            self.on_first()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        self._gate()
        return self.model.embed_texts(texts)

    def embed_images(self, images: list[Any]) -> np.ndarray:
        self._gate()
        return self.model.embed_images(images)


def states(jobs: Any, job_id: str) -> dict[str, tuple[str, str | None]]:
    status = jobs.get(job_id)
    return {} if status is None else {i.id: (i.state, i.error) for i in status.items}


def wait_for(predicate: Any) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def start(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def run_until_done(worker: Worker, jobs: Any, job_id: str) -> None:
    """Run ``worker`` in a thread until job ``job_id`` is done, then stop it (and check it
    stopped)."""
    thread = start(worker)
    try:
        assert wait_for(lambda: jobs.get(job_id).state == "done")
    finally:
        worker.stop()
        thread.join(WAIT_S)
    assert not thread.is_alive()


def test_next_batch_decodes_while_one_encodes(backend: Any, tmp_path: Path, model: Any) -> None:  # noqa: F811
    queue, jobs, sink, galleries, applier = backend
    seen: dict[str, Any] = {}

    def second_batch_decoded() -> None:  # called inside the first batch's encode
        seen["ahead"] = wait_for(lambda: states(jobs, "j").get("p2", ("",))[0] != "queued")
        seen["first_done"] = states(jobs, "j")["p0"][0]

    worker = Worker(
        GateModel(model, second_batch_decoded),
        queue,
        jobs,
        sink,
        make_settings(tmp_path, None, batch_size=2, batch_wait_ms=0),
    )
    items = [
        {"id": "p0", "modality": "image", "data": b64_image((255, 0, 0))},
        {"id": "p1", "modality": "image", "data": b64_image((0, 255, 0))},
        {"id": "p2", "modality": "image", "data": b64_image((0, 0, 255))[:60]},  # corrupt
        {"id": "p3", "modality": "image", "data": b64_image((9, 9, 9), size=(30, 80))},
        {"id": "p4", "modality": "image", "data": b64_image((200, 100, 0))},
    ]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    run_until_done(worker, jobs, "j")
    # the second batch was decoded (its bad item already failed) while the first encoded
    assert seen == {"ahead": True, "first_done": "encoding"}
    final = states(jobs, "j")
    assert final["p2"][0] == "failed" and "corrupt" in (final["p2"][1] or "")
    assert all(final[i][0] == "indexed" for i in ("p0", "p1", "p3", "p4"))
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    if applier is not None:
        applier.catch_up()
    assert sorted(galleries["image"].ids()) == ["p0", "p1", "p3", "p4"]
    # vectors are the model's for the image as decoded (fitting ahead changes nothing)
    raw = base64.b64decode(items[3]["data"])
    expect = model.embed_images([media.load_image(raw, make_settings(tmp_path, None).ingest)])[0]
    np.testing.assert_array_equal(galleries["image"].get("p3").vectors[0], expect)  # type: ignore[union-attr]
    # the thumbnail is made from the full-size image, not from the model's square input
    store = FileThumbnailStore(tmp_path / "data" / "thumbnails")
    found = store.get("p3")
    assert found is not None and Image.open(io.BytesIO(found[1])).size == (30, 80)


def test_stop_finishes_the_prefetched_batch(backend: Any, tmp_path: Path, model: Any) -> None:  # noqa: F811
    queue, jobs, sink, galleries, applier = backend
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        inside.set()
        release.wait(WAIT_S)

    worker = Worker(
        GateModel(model, hold),
        queue,
        jobs,
        sink,
        make_settings(tmp_path, None, batch_size=2, batch_wait_ms=0),
    )
    items = [{"id": f"t{i}", "modality": "text", "text": f"caption {i}"} for i in range(4)]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    thread = start(worker)
    try:
        assert inside.wait(WAIT_S)
        # the second batch is read and decoded behind the first
        assert wait_for(lambda: states(jobs, "j")["t3"][0] == "encoding")
        worker.stop()
    finally:
        release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()
    assert jobs.get("j").state == "done"  # type: ignore[union-attr]
    assert all(s == "indexed" for s, _ in states(jobs, "j").values())
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    if applier is not None:
        applier.catch_up()
    assert sorted(galleries["text"].ids()) == [f"t{i}" for i in range(4)]


def test_video_chunks_decode_ahead_and_fail_alone(
    tmp_path: Path, video_dir: Path, model: Any
) -> None:
    from service.jobs import LocalJobStore
    from service.queue import LocalQueue
    from service.sinks import GallerySink

    settings = make_settings(tmp_path, None, batch_size=8)
    settings.worker.video_frame_budget = 4  # each clip is a chunk of its own
    galleries = open_galleries(tmp_path / "index", model)
    queue = LocalQueue(tmp_path / "q.sqlite3")
    jobs = LocalJobStore(tmp_path / "jobs.sqlite3")
    names = ["sample_demo_3.mp4", "sample_demo_9.mp4", "sample_demo_1.mp4"]
    raws = [(video_dir / n).read_bytes() for n in names]
    items = [
        {"id": "a", "modality": "video", "data": base64.b64encode(raws[0]).decode()},
        {"id": "cut", "modality": "video", "data": base64.b64encode(raws[1][:50_000]).decode()},
        {"id": "b", "modality": "video", "data": base64.b64encode(raws[1]).decode()},
        {"id": "c", "modality": "video", "data": base64.b64encode(raws[2]).decode()},
    ]
    jobs.create("j", [i["id"] for i in items])
    queue.enqueue("j", items)
    worker = Worker(model, queue, jobs, GallerySink(galleries), settings)
    try:
        report = worker.run_once(block_ms=10)
    finally:
        worker.close()
    assert (report.indexed, report.failed) == (3, 1)
    final = states(jobs, "j")
    assert final["cut"][0] == "failed" and final["cut"][1]
    for item_id, raw in (("a", raws[0]), ("b", raws[1]), ("c", raws[2])):
        video = media.load_video(raw, settings.ingest)
        expect = model.embed_segments([s.frames for s in video.segments])
        rec = galleries["video"].get(item_id)
        assert rec is not None and rec.segments == video.spans
        np.testing.assert_allclose(rec.vectors, expect, atol=1e-6)
    store = FileThumbnailStore(tmp_path / "data" / "thumbnails")
    poster = store.get("a", part=0)
    assert store.count("a") == len(galleries["video"].get("a").segments)  # type: ignore[union-attr, arg-type]
    assert poster is not None
    w, h = Image.open(io.BytesIO(poster[1])).size
    assert w > h  # a 640x360 clip's poster keeps its shape (not the model's square input)
    queue.close()
    jobs.close()
    for g in galleries.values():
        g.close()


def test_run_once_and_run_give_the_same_vectors(tmp_path: Path, model: Any) -> None:
    """The pipelined loop and the in-line path run the same steps: same vectors."""
    from service.jobs import LocalJobStore
    from service.queue import LocalQueue
    from service.sinks import GallerySink

    items = [
        {"id": f"i{k}", "modality": "image", "data": b64_image((k * 40, 255 - k * 30, 7))}
        for k in range(6)
    ]
    out = []
    for mode in ("run_once", "run"):
        root = tmp_path / mode
        settings = make_settings(root, None, batch_size=2, batch_wait_ms=0)
        galleries = open_galleries(root / "index", model)
        queue = LocalQueue(root / "q.sqlite3")
        jobs = LocalJobStore(root / "jobs.sqlite3")
        jobs.create("j", [i["id"] for i in items])
        queue.enqueue("j", items)
        worker = Worker(model, queue, jobs, GallerySink(galleries), settings)
        if mode == "run_once":
            while queue.depth():
                worker.run_once(block_ms=10)
            worker.close()
        else:
            thread = start(worker)
            assert wait_for(lambda: jobs.get("j").state == "done")  # type: ignore[union-attr]  # noqa: B023
            worker.stop()
            thread.join(WAIT_S)
        out.append(np.stack([galleries["image"].get(i["id"]).vectors[0] for i in items]))  # type: ignore[union-attr]
        queue.close()
        jobs.close()
        for g in galleries.values():
            g.close()
    np.testing.assert_array_equal(out[0], out[1])


def test_unchanged_is_decided_after_the_batch_before_is_written(
    backend: Any,  # noqa: F811
    tmp_path: Path,
    model: Any,
) -> None:
    """A stored "v1" is changed to "v2" and back to "v1" by two batches; the second is read
    ahead while the first encodes, yet it is not skipped as unchanged against the stale "v1":
    the last write wins."""
    queue, jobs, sink, galleries, applier = backend
    settings = make_settings(tmp_path, None, batch_size=1, batch_wait_ms=0)
    jobs.create("j0", ["a"])
    queue.enqueue("j0", [{"id": "a", "modality": "text", "text": "v1"}])
    Worker(model, queue, jobs, sink, settings).run_once(block_ms=10)

    def back_to_v1_read_ahead() -> None:
        wait_for(lambda: states(jobs, "j2").get("a", ("",))[0] == "encoding")

    worker = Worker(GateModel(model, back_to_v1_read_ahead), queue, jobs, sink, settings)
    jobs.create("j1", ["a"])
    queue.enqueue("j1", [{"id": "a", "modality": "text", "text": "v2"}])
    jobs.create("j2", ["a"])
    queue.enqueue("j2", [{"id": "a", "modality": "text", "text": "v1"}])
    run_until_done(worker, jobs, "j2")
    if applier is not None:
        applier.catch_up()
    record = galleries["text"].get("a")
    assert record is not None and record.content_hash == media.content_hash("v1")
    np.testing.assert_allclose(record.vectors[0], model.embed_texts(["v1"])[0], atol=1e-6)


class CountingModel:
    """The tiny model; sets ``encoded[n]`` once its n-th text encode call (from 1) is done."""

    def __init__(self, model: Any, calls: int) -> None:
        self.model = model
        self.encoded = [threading.Event() for _ in range(calls + 1)]
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = self.model.embed_texts(texts)
        self.calls += 1
        if self.calls < len(self.encoded):
            self.encoded[self.calls].set()
        return out


class HeldSink:
    """A real sink whose first write waits until ``release`` is set (or WAIT_S passed)."""

    def __init__(self, sink: Any, release: threading.Event) -> None:
        self.sink = sink
        self.release = release
        self.writes = 0
        self.released_in_time: bool | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def write(self, records: Any) -> None:
        self.writes += 1
        if self.writes == 1:
            self.released_in_time = self.release.wait(WAIT_S)
        self.sink.write(records)


def test_next_batch_encodes_while_one_is_written_and_the_last_write_wins(
    backend: Any,  # noqa: F811
    tmp_path: Path,
    model: Any,
) -> None:
    """Write-behind: batch 2 encodes while batch 1's write is still held (the first write is
    released only by batch 2's encode), and although batch 2 sets "a" back to the content
    the store still holds while batch 1 ("a" -> "v2") is being written, it is not skipped as
    unchanged: writes land in order and the last one wins."""
    queue, jobs, sink, galleries, applier = backend
    settings = make_settings(tmp_path, None, batch_size=2, batch_wait_ms=0)
    jobs.create("j0", ["a"])
    queue.enqueue("j0", [{"id": "a", "modality": "text", "text": "v1"}])
    Worker(model, queue, jobs, sink, settings).run_once(block_ms=10)

    counting = CountingModel(model, 2)
    held = HeldSink(sink, counting.encoded[2])
    worker = Worker(counting, queue, jobs, held, settings)
    jobs.create("j1", ["a", "b"])
    queue.enqueue(
        "j1",
        [
            {"id": "a", "modality": "text", "text": "v2"},
            {"id": "b", "modality": "text", "text": "a bird"},
        ],
    )
    jobs.create("j2", ["a", "c"])
    queue.enqueue(
        "j2",
        [
            {"id": "a", "modality": "text", "text": "v1"},
            {"id": "c", "modality": "text", "text": "a cat"},
        ],
    )
    run_until_done(worker, jobs, "j2")
    assert held.released_in_time is True  # batch 2 encoded while batch 1 was being written
    assert held.writes == 2 and counting.calls == 2  # "a" of batch 2 was encoded, not skipped
    assert states(jobs, "j1") == {"a": ("indexed", None), "b": ("indexed", None)}
    assert states(jobs, "j2") == {"a": ("indexed", None), "c": ("indexed", None)}
    assert queue.stats() == {"depth": 0, "pending": 0, "dead_letters": 0}
    if applier is not None:
        applier.catch_up()
    assert sorted(galleries["text"].ids()) == ["a", "b", "c"]
    record = galleries["text"].get("a")
    assert record is not None and record.content_hash == media.content_hash("v1")
    np.testing.assert_allclose(record.vectors[0], model.embed_texts(["v1"])[0], atol=1e-6)
