"""A real ``xmodal serve`` subprocess for tests (no tests here): a free port, a temp data dir,
no fsync, the caller's settings as ``XMODAL_*`` variables, and an HTTP client on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.service.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """A real ``xmodal serve`` subprocess and an HTTP client on it."""

    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
        full_env.update(
            {
                "XMODAL_INDEX__FSYNC": "false",
                "XMODAL_LOG_JSON": "true",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                **env,  # the caller's settings win
            }
        )
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args, "--data-dir", str(data_dir)],
            cwd=REPO,
            env=full_env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-4000:]
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def wait_job(
        self, job_id: str, timeout: float = 600, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/jobs/{job_id}", headers=headers).json()
            if job["state"] in ("done", "failed"):
                return dict(job)
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not done in {timeout}s")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
