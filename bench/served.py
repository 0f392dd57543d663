"""Helpers the service benchmarks share: a real ``xmodal serve`` in a subprocess, real captions.

Imported by ``bench/search.py`` and ``bench/ingest.py`` (run as scripts, so ``bench/`` is on
``sys.path``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
VIDEOS = REPO.parent / "shared" / "data" / "video"


def emit(out: dict, as_json: bool, checkout: Path | None = None) -> None:
    """Print one result: a JSON line, or aligned ``key  value`` lines; ``checkout`` (the
    ``--serve-from`` folder the server ran) is recorded when given."""
    if checkout is not None:
        out["serve_from"] = str(checkout)
    if as_json:
        print(json.dumps(out), flush=True)
        return
    width = max(map(len, out))
    for key, value in out.items():
        print(f"{key:>{width}s}  {value}")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads) of process ``pid`` (None: this one) so far.

    Beside the wall clock, which a shared machine's load moves by tens of percent, the CPU
    seconds a side spends per photo or per search say what it costs: the steadier comparison
    on a loaded machine, and one that counts a thread spinning idle, which a wall clock hides."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dev_rows(data: Path, split: str = "dev") -> list[dict]:
    """Rows of ``captions.jsonl`` in ``split`` (all rows when the split is absent)."""
    rows = [json.loads(line) for line in (data / "captions.jsonl").open()]
    return [r for r in rows if r.get("split") == split] or rows


def captions(data: Path, n: int) -> list[str]:
    """The first caption of the first ``n`` dev images."""
    return [r["captions"][0] for r in dev_rows(data)[:n]]


class Server:
    """``xmodal serve`` on embedded defaults over ``data_dir``, on a free port, in a
    subprocess (its log in ``data_dir/serve.log``). Use as a context manager."""

    def __init__(
        self,
        data_dir: Path,
        threads: int,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.cwd = Path(cwd)  # the checkout whose code serves
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, XMODAL_DATA_DIR=str(data_dir), **(env or {}))
        self.env["OMP_NUM_THREADS"] = str(threads)  # torch's (and so ONNX Runtime's) threads
        self.env.setdefault("PYTHONPATH", str(self.cwd))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "serve.log", "wb")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1"]
            + ["--port", str(self.port)],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        """The server process's id (for its CPU time)."""
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"xmodal serve exited with {self.proc.returncode}; see "
                    f"{self.data_dir / 'serve.log'}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("xmodal serve did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
