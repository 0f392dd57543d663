"""The user-facing commands against a real ``xmodal serve`` (embedded, shipped model, temp dir).

A folder of 30 real Flickr8k photos plus one corrupt file: ``xmodal ingest`` indexes the 30,
reports the corrupt one with the server's reason and exits 1; a second run skips all 30.
``xmodal search`` finds photos by their captions; ``xmodal jobs`` lists the jobs;
``xmodal dead-letters`` lists the item of a worker that crashed mid-batch and re-queues it;
``xmodal snapshot create`` -> ``restore`` into a fresh data dir -> a new server answers the
same searches (QB-Norm on, querybank included) with identical results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import Client
from tests.service.serve_process import ServeProcess

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N_PHOTOS = 30
CRASHED_TEXT = "a red boat moored in a quiet harbour at dawn"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env.update(
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        XMODAL_INDEX__FSYNC="false",
        XMODAL_LOG_JSON="true",
        # a crashed worker's message is dead-lettered at its next delivery
        XMODAL_WORKER__MAX_DELIVERIES="1",
        XMODAL_WORKER__CLAIM_IDLE_MS="500",
    )
    return env


def start_server(data_dir: Path, log: Path) -> ServeProcess:
    """A ready ``xmodal serve`` with this module's worker settings."""
    server = ServeProcess(data_dir, log, **{k: v for k, v in _env().items() if "XMODAL_" in k})
    server.wait_ready()
    return server


def xmodal(*args: str, url: str) -> tuple[int, Any, str]:
    """Run ``xmodal ARGS --url URL [--json]`` as a user would; (exit code, JSON, stderr)."""
    cmd = [sys.executable, "-m", "service.cli", *args, "--url", url, "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    body = json.loads(lines[-1]) if lines else None
    return out.returncode, body, out.stderr


@pytest.fixture(scope="module")
def photos(flickr_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rows = [json.loads(line) for line in (flickr_dir / "captions.jsonl").open()]
    dev = [r for r in rows if r["split"] == "dev"][:N_PHOTOS]
    folder = tmp_path_factory.mktemp("photos")
    for r in dev:
        shutil.copy(flickr_dir / "images" / r["image"], folder / r["image"])
    good = (flickr_dir / "images" / dev[0]["image"]).read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    (folder / "notes.csv").write_text("not media\n")
    return {"folder": folder, "rows": dev}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    # A worker took this message and died before acking it (the real queue and job store).
    from service.jobs import LocalJobStore
    from service.queue import LocalQueue

    queue, jobs = LocalQueue(data / "queue.sqlite3"), LocalJobStore(data / "jobs.sqlite3")
    item = {"id": "crashed-1", "modality": "text", "text": CRASHED_TEXT, "metadata": {}}
    jobs.create("crashed-job", ["crashed-1"])
    queue.enqueue("crashed-job", [item])
    held = queue.read("worker-that-crashed", 10)
    assert len(held) == 1
    # that worker was already retrying it alone when it died (a crash pinned on this item):
    # with max_deliveries 1 the next delivery dead-letters it instead of trying again
    queue.mark_solo(held[0])
    queue.close()
    jobs.close()
    srv = start_server(data, root / "serve.log")
    try:
        yield {"server": srv, "root": root}
    finally:
        srv.stop()


def _found(url: str, rows: list[dict[str, Any]], ids: dict[str, str]) -> list[bool]:
    hits = []
    for r in rows:
        rc, body, err = xmodal("search", r["captions"][1], "--top-k", "5", url=url)
        assert rc == 0, err
        hits.append(ids[r["image"]] in [h["id"] for h in body["results"]])
    return hits


def test_ingest_search_jobs_dead_letters_snapshot(
    photos: dict[str, Any], server: dict[str, Any]
) -> None:
    url = server["server"].url
    folder: Path = photos["folder"]

    # 1. first run: 30 indexed, the corrupt file reported with the server's reason, exit 1
    rc, summary, err = xmodal("ingest", str(folder), "--no-progress", url=url)
    assert rc == 1, err
    assert summary["indexed"] == N_PHOTOS, summary
    assert summary["skipped"] == 0
    failed = list(summary["failed"].values())
    assert len(failed) == 1 and failed[0]["path"] == str(folder / "corrupt.jpg")
    assert "corrupt or truncated" in failed[0]["reason"]
    assert summary["ignored"] == [str(folder / "notes.csv")]

    # 2. second run: everything indexed is skipped; the corrupt file fails again
    rc, again, err = xmodal("ingest", str(folder), "--no-progress", url=url)
    assert rc == 1, err
    assert (again["indexed"], again["skipped"], len(again["failed"])) == (0, N_PHOTOS, 1)
    assert again["jobs"] == []  # nothing was sent but the corrupt file, which was refused

    # 3. search by caption (a caption not stored anywhere: the second of each photo)
    from service.commands.ingest import item_id

    ids = {r["image"]: item_id(folder / r["image"]) for r in photos["rows"]}
    rc, body, err = xmodal("search", photos["rows"][0]["captions"][1], url=url)
    assert rc == 0, err
    assert body["results"] and all(h["modality"] in ("image", "video") for h in body["results"])
    found = _found(url, photos["rows"][:10], ids)
    assert sum(found) >= 7, f"caption -> photo in the top 5 for {sum(found)}/10"
    table = subprocess.run(
        [sys.executable, "-m", "service.cli", "search", "a dog", "--url", url, "--top-k", "3"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert table.returncode == 0 and "score" in table.stdout and "results in" in table.stdout

    # 4. jobs: the first run's job(s) with 30 indexed items
    rc, jobs, err = xmodal("jobs", url=url)
    assert rc == 0, err
    assert sum(j["counts"].get("indexed", 0) for j in jobs if j["job_id"] != "crashed-job") == 30

    # 5. dead letters: the crashed worker's item, then requeued and indexed
    deadline = time.monotonic() + 60
    while True:
        rc, letters, err = xmodal("dead-letters", "list", url=url)
        assert rc == 0, err
        if letters or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [d["item_id"] for d in letters] == ["crashed-1"], letters
    assert "crashed" in letters[0]["error"] and letters[0]["requeueable"]
    rc, requeued, err = xmodal("dead-letters", "requeue", "--all", url=url)
    assert rc == 0, (requeued, err)
    assert requeued["requeued"] == [letters[0]["message_id"]]
    assert requeued["job"]["state"] == "done"
    assert xmodal("dead-letters", "list", url=url)[1] == []
    with Client(url) as xm:
        hits = xm.search(CRASHED_TEXT, targets=["text"], top_k=1)["results"]
        assert hits[0]["id"] == "crashed-1"
        # the shipped banks were seeded on start; append to the text bank, so the snapshot
        # carries a bank that differs from the shipped one
        shipped = xm.get("/querybank")["size"]
        assert shipped > 0, "the model's shipped text bank is served from the start"
        bank = [c for r in photos["rows"][10:] for c in r["captions"]]
        appended = xm.post("/querybank", json={"texts": bank})
        assert shipped < appended["size"] <= shipped + len(set(bank))

    # 6. snapshot -> restore into a fresh data dir -> identical search results
    queries = [r["captions"][2] for r in photos["rows"][:5]]

    def answers(url: str) -> list[list[tuple[str, float, float]]]:
        out = []
        with Client(url) as xm:
            for q in queries:
                res = xm.search(q, top_k=10)
                assert res["qbnorm_applied"]
                out.append([(h["id"], h["score"], h["raw_score"]) for h in res["results"]])
            res = xm.search(CRASHED_TEXT, targets=["text"], top_k=3)
            out.append([(h["id"], h["score"], h["raw_score"]) for h in res["results"]])
        return out

    before = answers(url)
    snap = server["root"] / "snap"
    rc, manifest, err = xmodal("snapshot", "create", str(snap), url=url)
    assert rc == 0, err
    assert manifest["galleries"]["image"]["items"] == N_PHOTOS
    assert manifest["galleries"]["text"]["items"] == 1
    assert manifest["querybank"]["t2v"] == appended["size"]
    assert manifest["querybank"]["i2t"] > 0  # the shipped image bank travels too
    fresh = server["root"] / "fresh"
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "snapshot", "restore", str(snap)]
        + ["--data-dir", str(fresh)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    # restoring over an existing index is refused
    again_out = subprocess.run(
        [sys.executable, "-m", "service.cli", "snapshot", "restore", str(snap)]
        + ["--data-dir", str(fresh)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert again_out.returncode == 1 and "already holds an index" in again_out.stderr
    server["server"].stop()
    restored = start_server(fresh, server["root"] / "restored.log")
    try:
        assert answers(restored.url) == before
    finally:
        restored.stop()


def test_every_command_has_help_with_an_example() -> None:
    from service import cli

    for name in ("ingest", "search", "jobs", "dead-letters", "snapshot", "config"):
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", name, "--help"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert "example:" in out.stdout and f"xmodal {name}" in out.stdout
        assert name in cli.COMMANDS
