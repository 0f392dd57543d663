"""The ``xmodal`` console script: dispatch, ``serve`` flags over settings, ``querybank build``,
and a real ``xmodal serve`` process (embedded mode, tiny model) from start to SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import cli
from service.commands import querybank as querybank_cmd
from service.commands import serve as serve_cmd


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "worker", "train", "eval", "querybank"):
        assert name in out
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_dispatch_passes_the_remaining_args(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(querybank_cmd, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["querybank", "build", "--data", "x"]) == 0
    assert seen == [["build", "--data", "x"]]


def test_serve_flags_override_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XMODAL_PORT", "9000")
    monkeypatch.setenv("XMODAL_HOST", "0.0.0.0")
    monkeypatch.setenv("XMODAL_DATA_DIR", "/nonexistent/env-dir")
    settings = serve_cmd.load_settings(serve_cmd.parse_args([]))
    assert (settings.port, settings.host, str(settings.data_dir)) == (
        9000,
        "0.0.0.0",
        "/nonexistent/env-dir",
    )
    args = serve_cmd.parse_args(
        ["--port", "9100", "--host", "127.0.0.2", "--data-dir", str(tmp_path)]
    )
    settings = serve_cmd.load_settings(args)
    assert (settings.port, settings.host, settings.data_dir) == (9100, "127.0.0.2", tmp_path)


def test_serve_refuses_invalid_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XMODAL_REDIS_URL", "http://not-redis")
    assert cli.main(["serve"]) == 2
    assert "XMODAL_REDIS_URL" in capsys.readouterr().err


def _captions(tmp_path: Path) -> Path:
    rows = [
        {"image": "a.jpg", "split": "train", "captions": ["a dog", "a brown dog", "dog"]},
        {"image": "b.jpg", "split": "train", "captions": ["a cat", "a cat", "grey cat"]},
        {"image": "c.jpg", "split": "dev", "captions": ["a boat", "boat", "ship"]},
    ]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_read_captions_round_robin_dedup(tmp_path: Path) -> None:
    data = _captions(tmp_path)
    assert querybank_cmd.read_captions(data, "train", 3) == ["a dog", "a cat", "a brown dog"]
    assert querybank_cmd.read_captions(data, "train", 100) == [
        "a dog",
        "a cat",
        "a brown dog",
        "dog",
        "grey cat",
    ]
    with pytest.raises(ValueError, match="split"):
        querybank_cmd.read_captions(data, "test", 5)


def test_querybank_build_stores_the_bank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _captions(tmp_path / "flickr")
    for key in list(os.environ):
        if key.startswith("XMODAL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XMODAL_MODEL__NAME", "tiny-random")
    monkeypatch.setenv("XMODAL_DATA_DIR", str(tmp_path / "data"))
    argv = ["querybank", "build", "--data", str(data), "--split", "train", "--limit", "4"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["encoded"] == 4 and summary["size"] == 4 and summary["direction"] == "t2v"

    from index.querybank import FileQueryBankStore

    bank = FileQueryBankStore(tmp_path / "data" / "querybank").get("tiny-random", "t2v")
    assert bank is not None and len(bank) == 4 and bank.vectors.shape == (4, 64)
    assert bank.texts == ["a dog", "a cat", "a brown dog", "dog"]
    assert cli.main(["querybank", "build", "--data", str(tmp_path / "missing")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_xmodal_serve_process_end_to_end(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env.update(XMODAL_MODEL__NAME="tiny-random", XMODAL_INDEX__FSYNC="false")
    log = tmp_path / "serve.log"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=repo,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.3)
            item = {"id": "cli-1", "modality": "text", "text": "a lighthouse on a cliff"}
            r = client.post("/ingest", json={"items": [item]})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            while client.get(f"/jobs/{job_id}").json()["state"] != "done":
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            r = client.post("/search", json={"text": item["text"], "targets": ["text"]})
            assert r.json()["results"][0]["id"] == "cli-1"
            assert r.headers["x-request-id"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert any(m.startswith("POST /search 200") for m in messages)
    assert any(line.get("request_id") for line in lines)
    assert "stopped" in messages  # the lifespan's graceful shutdown ran
    assert list((tmp_path / "data" / "index" / "tiny-random" / "text").glob("snapshot.*"))


def test_export_renames_and_halves_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from models.factory import get_model_config
    from models.model import XModal
    from service.commands import export as export_cmd

    cfg = get_model_config("tiny-random").model_copy(update={"name": "my-run", "seed": 5})
    model = XModal(cfg, pretrained=False)
    src = save_checkpoint(model, tmp_path / "run.safetensors", extra={"epoch": 3})
    out = tmp_path / "ship.safetensors"
    assert cli.main(["export", "--checkpoint", str(src), "--out", str(out), "--half"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and len(report["sha256"]) == 64
    assert out.stat().st_size < 0.6 * src.stat().st_size
    config, _, _, extra = read_checkpoint(out)
    assert config.name == "my-run" and extra["epoch"] == 3
    texts = ["a dog on the grass", "two people"]
    assert abs(load_checkpoint(out).embed_texts(texts) - model.embed_texts(texts)).max() < 5e-3

    # Renaming to a registry name whose config differs would serve mismatched weights.
    with pytest.raises(SystemExit, match="differs from the registry config"):
        export_cmd.main(["--checkpoint", str(src), "--out", str(out), "--name", "tiny-random"])
    renamed = tmp_path / "renamed.safetensors"
    tiny = XModal(get_model_config("tiny-random").model_copy(update={"name": "x"}), False)
    src2 = save_checkpoint(tiny, tmp_path / "x.safetensors")
    export_cmd.main(["--checkpoint", str(src2), "--out", str(renamed), "--name", "tiny-random"])
    assert read_checkpoint(renamed)[0] == get_model_config("tiny-random")


def test_serve_on_a_busy_port_fails_at_once_with_the_reason(tmp_path: Path) -> None:
    """The port is checked before the model loads: a one-line error and exit code 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMODAL_")}
    env["XMODAL_MODEL__NAME"] = "tiny-random"
    repo = Path(__file__).resolve().parents[2]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        cmd += ["--data-dir", str(tmp_path / "data")]
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "starting xmodal API" not in done.stderr  # nothing was loaded
    assert not (tmp_path / "data").exists()
