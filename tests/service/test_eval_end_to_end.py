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


def test_both_directions_are_normalised_with_their_banks(
    capsys: pytest.CaptureFixture[str], flickr_dir: Path
) -> None:
    bank = ["--querybank-data", str(flickr_dir), "--querybank-split", "train"]
    both = _run(capsys, flickr_dir, *bank)
    t2i = _run(capsys, flickr_dir, *bank, "--querybank-directions", "t2i")
    assert both["qbnorm_directions"] == "t2i,i2t" and t2i["qbnorm_directions"] == "t2i"
    assert both["qbnorm_bank_image"] == 24 and both["qbnorm_bank_text"] == t2i["qbnorm_bank_text"]
    # t2i only: image-to-text stays raw; both: the t2i half is the same, i2t has its own bank
    assert all(t2i[f"qbnorm_i2t_r{k}"] == t2i[f"i2t_r{k}"] for k in (1, 5, 10))
    assert all(both[f"qbnorm_t2i_r{k}"] == t2i[f"qbnorm_t2i_r{k}"] for k in (1, 5, 10))
    assert {f"qbnorm_i2t_r{k}" for k in (1, 5, 10)} <= set(both)
