"""`xmodal eval --end-to-end` measures the served path, and the ONNX engine scores as eager."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.commands import eval as eval_cmd

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")


def _run(capsys: pytest.CaptureFixture[str], flickr: Path, *extra: str) -> dict:
    argv = ["--data", str(flickr), "--split", "dev", "--max-images", "24", "--end-to-end"]
    assert eval_cmd.main([*argv, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_onnx_and_eager_give_the_same_metrics_on_real_photos(
    capsys: pytest.CaptureFixture[str], flickr_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh graph cache
    fast = _run(capsys, flickr_dir)
    eager = _run(capsys, flickr_dir, "--engine", "eager")
    assert fast["engine"] == "onnx" and eager["engine"] == "eager"
    assert any((tmp_path / "xmodal" / "onnx").iterdir()), "the graphs were cached"
    keys = [k for k in fast if k.startswith(("i2t", "t2i", "rsum", "medr"))]
    assert keys and {k: fast[k] for k in keys} == {k: eager[k] for k in keys}
    assert fast["rsum"] > 300  # 24 photos: the trained model ranks far above chance (~115)
