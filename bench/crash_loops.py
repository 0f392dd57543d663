"""Crash loops (issue #15): SIGKILL real processes while they ingest real photos, then check.

Three loops, each on fresh state (the Redis ones on a redis-server of their own, AOF on):

- ``embedded``: ``xmodal serve`` (API + in-process worker) SIGKILLed N times during ingest;
- ``worker``: a Redis-mode ``xmodal worker`` (same consumer name) SIGKILLed N times mid-batch
  while an API keeps accepting jobs;
- ``api``: the Redis-mode ``xmodal serve`` SIGKILLed N times while clients post jobs.

After each loop: every 202'd item is indexed exactly once (visible by id; the index holds
exactly the distinct ids that were queued), no job is stuck or failed, nothing is
dead-lettered, and the drain time after the last restart is reported next to what normal speed
(measured first, on the same setup) would take for the work that was left.

    python bench/crash_loops.py                       # 20 / 10 / 10 kills, JSON on stdout
    python bench/crash_loops.py --embedded 3 --worker 2 --api 2 --json out.json

Needs the photos in ../shared/data/flickr8k/images and ``redis-server`` on PATH (Redis loops).
The model is ``tiny-random`` (encoding is not what is measured; decode, queue and restart are).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
PHOTOS = (
    Path(os.environ.get("XMODAL_SHARED_DATA", REPO.parent / "shared" / "data"))
    / "flickr8k"
    / "images"
)
PER_JOB = 20  # photos per POST /ingest (the batch of 20 valid photos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ledger:
    """What the clients tried and what was accepted (202), across restarts."""

    photos: Iterator[str]
    attempted: set[str] = field(default_factory=set)
    accepted: dict[str, list[str]] = field(default_factory=dict)  # job id -> item ids
    unexpected: list[str] = field(default_factory=list)  # any answer but 202/429/503
    counter: itertools.count = field(default_factory=itertools.count)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_items(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            items = []
            for _ in range(n):
                name = next(self.photos)
                item_id = f"p{next(self.counter)}"
                self.attempted.add(item_id)
                items.append({"id": item_id, "modality": "image", "path": name})
            return items

    def accepted_ids(self) -> set[str]:
        return {i for ids in self.accepted.values() for i in ids}


class Proc:
    """A child process with its log in a file; ``kill()`` is SIGKILL."""

    spawned = itertools.count()

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        log = log.with_name(f"{log.stem}-{next(Proc.spawned):03d}.log")  # one per spawn
        self.log = log
        self.started = time.monotonic()
        self.p = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            cwd=REPO,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)

    def terminate(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def wait_log(self, text: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if self.p.poll() is not None:
                raise RuntimeError(f"process exited ({self.p.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not in {self.log} after {timeout} s")
            time.sleep(0.05)


def env_for(data_dir: Path, port: int, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env.update(
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        XMODAL_MODEL__NAME="tiny-random",
        XMODAL_MODEL__THREADS="2",
        XMODAL_DATA_DIR=str(data_dir),
        XMODAL_PORT=str(port),
        XMODAL_LOG_JSON="false",
        XMODAL_LOG_LEVEL="INFO",
        XMODAL_INGEST__MEDIA_ROOT=str(PHOTOS),
        XMODAL_WORKER__CONSUMER="crash-worker",
        XMODAL_WORKER__METRICS_PORT="0",
        XMODAL_WORKER__BATCH_WAIT_MS="50",
    )
    if redis_url:
        env["XMODAL_REDIS_URL"] = redis_url
    return env


def wait_ready(url: str, proc: Proc | None = None, timeout: float = 180.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"API exited ({proc.p.returncode}); see {proc.log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def post_jobs(url: str, ledger: Ledger, stop: threading.Event, pause_s: float = 0.0) -> None:
    """Post jobs of PER_JOB photos until ``stop`` or the server goes away."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            items = ledger.next_items(PER_JOB)
            try:
                r = client.post("/ingest", json={"items": items})
            except httpx.TransportError:
                return  # killed under us: this job may or may not have been queued
            if r.status_code == 202:
                with ledger.lock:
                    ledger.accepted[r.json()["job_id"]] = [i["id"] for i in items]
            elif r.status_code in (429, 503):
                time.sleep(0.2)
            else:
                ledger.unexpected.append(f"{r.status_code} {r.text[:200]}")
            if pause_s:
                stop.wait(pause_s)


def unfinished(url: str, ledger: Ledger) -> int:
    """Items of accepted jobs not yet in a terminal state."""
    n = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        for job_id in list(ledger.accepted):
            job = client.get(f"/jobs/{job_id}").json()
            n += sum(it["state"] not in ("indexed", "failed") for it in job["items"])
    return n


def wait_drained(url: str, ledger: Ledger, timeout: float = 600.0) -> dict[str, Any]:
    """Wait until every accepted job is done; then check the index item by item."""
    deadline = time.monotonic() + timeout
    states: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        pending = dict(ledger.accepted)
        while pending:
            for job_id in list(pending):
                job = client.get(f"/jobs/{job_id}").json()
                if job["state"] in ("done", "failed"):
                    for it in job["items"]:
                        states[it["state"]] = states.get(it["state"], 0) + 1
                    del pending[job_id]
            if pending and time.monotonic() > deadline:
                break
            if pending:
                time.sleep(0.1)
        drained_at = time.monotonic()
        visible = set()
        for item_id in sorted(ledger.attempted):
            for _ in range(100):  # Redis mode: the replica may lag the job store briefly
                code = client.get(f"/items/{item_id}").status_code
                if code == 200 or item_id not in ledger.accepted_ids():
                    break
                time.sleep(0.05)
            if code == 200:
                visible.add(item_id)
        metrics = client.get("/metrics").text
    index_size = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("xmodal_index_items{")
    )
    dead = [ln for ln in metrics.splitlines() if ln.startswith("xmodal_ingest_dead_letters ")]
    accepted = ledger.accepted_ids()
    return {
        "drained_at": drained_at,
        "stuck_jobs": len(pending),
        "item_states": states,
        "accepted_items": len(accepted),
        "accepted_missing": len(accepted - visible),
        "indexed_distinct": len(visible),
        "index_size": int(index_size),
        "exactly_once": not (accepted - visible) and int(index_size) == len(visible),
        "dead_letters": int(float(dead[0].split()[-1])) if dead else None,
        "unexpected_answers": ledger.unexpected[:5],
    }


def normal_rate(url: str, ledger: Ledger, jobs: int = 3) -> float:
    """Items/s on this setup with nothing crashing: ``jobs`` jobs posted at once."""
    t0 = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client:
        ids = []
        for _ in range(jobs):
            items = ledger.next_items(PER_JOB)
            r = client.post("/ingest", json={"items": items})
            r.raise_for_status()
            ledger.accepted[r.json()["job_id"]] = [i["id"] for i in items]
            ids.append(r.json()["job_id"])
        while any(client.get(f"/jobs/{j}").json()["state"] not in ("done", "failed") for j in ids):
            time.sleep(0.05)
    return jobs * PER_JOB / (time.monotonic() - t0)


def summarise(
    name: str,
    kills: int,
    rate: float,
    left: int,
    restart: float,
    ready: float,
    check: dict[str, Any],
) -> dict[str, Any]:
    drain_from_ready = check.pop("drained_at") - ready
    normal = left / rate if rate else 0.0
    ok = (
        check["exactly_once"]
        and check["stuck_jobs"] == 0
        and check["item_states"].get("failed", 0) == 0
        and not check["dead_letters"]
        and not check["unexpected_answers"]
    )
    return {
        "loop": name,
        "kills": kills,
        "normal_items_per_s": round(rate, 1),
        "items_left_at_last_restart": left,
        "restart_to_ready_s": round(ready - restart, 2),
        "drain_after_ready_s": round(drain_from_ready, 2),
        "normal_speed_would_take_s": round(normal, 2),
        "within_10s_of_normal": drain_from_ready <= normal + 10.0,
        **check,
        "ok": ok,
    }


def run_embedded(kills: int, work: Path, ledger: Ledger) -> dict[str, Any]:
    data, port = work / "embedded", free_port()
    url, env = f"http://127.0.0.1:{port}", env_for(data, port, None)
    api = Proc(["serve"], env, work / "embedded-api.log")
    wait_ready(url, api)
    rate = normal_rate(url, ledger)
    api.kill()
    for _ in range(kills):
        api = Proc(["serve"], env, work / "embedded-api.log")
        wait_ready(url, api)
        stop = threading.Event()
        poster = threading.Thread(target=post_jobs, args=(url, ledger, stop))
        poster.start()
        time.sleep(random.uniform(0.5, 2.0))
        api.kill()  # API and worker die together, with jobs in flight
        stop.set()
        poster.join(60)
    restart = time.monotonic()
    api = Proc(["serve"], env, work / "embedded-api.log")
    ready = wait_ready(url, api)
    left = unfinished(url, ledger)
    check = wait_drained(url, ledger)
    api.terminate()
    return summarise("embedded", kills, rate, left, restart, ready, check)


class OwnRedis:
    def __init__(self, work: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not on PATH")
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        self.p = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(work),
             "--appendonly", "yes", "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        self.p.kill()
        self.p.wait(10)


def run_worker(kills: int, work: Path, ledger: Ledger) -> dict[str, Any]:
    server = OwnRedis(work / "redis-worker")
    port = free_port()
    url, env = f"http://127.0.0.1:{port}", env_for(work / "worker-api", port, server.url)
    api = Proc(["serve"], env, work / "worker-api.log")
    worker = Proc(["worker"], env, work / "worker.log")
    try:
        wait_ready(url, api)
        worker.wait_log("worker crash-worker started")
        rate = normal_rate(url, ledger)
        stop = threading.Event()
        poster = threading.Thread(target=post_jobs, args=(url, ledger, stop, 0.3))
        poster.start()
        for i in range(kills):
            time.sleep(random.uniform(0.3, 1.5))  # mid-batch: jobs keep arriving
            worker.kill()
            worker = Proc(["worker"], env, work / "worker.log")
            if i < kills - 1:
                worker.wait_log("worker crash-worker started", timeout=180)
        stop.set()
        poster.join(60)
        restart = worker.started
        worker.wait_log("worker crash-worker started")
        ready = time.monotonic()
        left = unfinished(url, ledger)
        check = wait_drained(url, ledger)
        return summarise("worker", kills, rate, left, restart, ready, check)
    finally:
        worker.terminate()
        api.terminate()
        server.stop()


def run_api(kills: int, work: Path, ledger: Ledger) -> dict[str, Any]:
    server = OwnRedis(work / "redis-api")
    port = free_port()
    url, env = f"http://127.0.0.1:{port}", env_for(work / "api-api", port, server.url)
    worker = Proc(["worker"], env, work / "api-worker.log")
    api = Proc(["serve"], env, work / "api-api.log")
    try:
        wait_ready(url, api)
        worker.wait_log("worker crash-worker started")
        rate = normal_rate(url, ledger)
        for _ in range(kills):
            api.kill()
            api = Proc(["serve"], env, work / "api-api.log")
            wait_ready(url, api)
            stop = threading.Event()
            poster = threading.Thread(target=post_jobs, args=(url, ledger, stop))
            poster.start()
            time.sleep(random.uniform(0.5, 2.0))
            api.kill()  # requests in flight are cut; 202'd ones must all be indexed
            stop.set()
            poster.join(60)
        restart = time.monotonic()
        api = Proc(["serve"], env, work / "api-api.log")
        ready = wait_ready(url, api)
        left = unfinished(url, ledger)
        check = wait_drained(url, ledger)
        return summarise("api", kills, rate, left, restart, ready, check)
    finally:
        api.terminate()
        worker.terminate()
        server.stop()


def photo_cycle() -> Iterator[str]:
    names = sorted(p.name for p in PHOTOS.glob("*.jpg"))
    if not names:
        raise SystemExit(f"no photos in {PHOTOS}")
    return itertools.cycle(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedded", type=int, default=20, help="SIGKILLs of the embedded API")
    parser.add_argument("--worker", type=int, default=10, help="SIGKILLs of the Redis worker")
    parser.add_argument("--api", type=int, default=10, help="SIGKILLs of the Redis-mode API")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args(argv)
    random.seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="xmodal-crash-"))
    results = []
    try:
        for _, kills, fn in (
            ("embedded", args.embedded, run_embedded),
            ("worker", args.worker, run_worker),
            ("api", args.api, run_api),
        ):
            if kills <= 0:
                continue
            t0 = time.monotonic()
            result = fn(kills, work, Ledger(photo_cycle()))
            result["loop_wall_s"] = round(time.monotonic() - t0, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        if args.keep:
            print(f"logs in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
