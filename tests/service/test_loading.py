"""The precision setting picks the CPU fast path in one place (service.loading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.runtime_bf16 import bf16_unavailable
from service.loading import load_serving_model
from service.settings import ModelSettings, Settings

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the eager path runs)")


def test_precision_setting_reaches_the_engine_with_a_float32_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XMODAL_MODEL__PRECISION", "bf16")
    settings = Settings().model
    assert settings.precision == "bf16"
    settings = settings.model_copy(update={"name": "tiny-random", "onnx_cache_dir": tmp_path})
    model = load_serving_model(settings, device="cpu")
    # bf16 where the CPU has AMX-BF16 and openvino is installed; float32 ONNX Runtime elsewhere
    expected = "bf16" if bf16_unavailable() is None else "fp32"
    assert getattr(model.runtime, "precision", None) == expected
    assert model.embed_texts(["a dog", "a red car"]).shape == (2, model.embed_dim)


def test_the_default_precision_is_float32() -> None:
    assert ModelSettings().precision == "fp32"


def test_the_precision_setting_offers_exactly_the_engine_precisions() -> None:
    """settings.py stays torch-free, so it spells the choice out; it must match the engine's."""
    from typing import get_args

    from models.runtime import PRECISIONS

    assert get_args(ModelSettings.model_fields["precision"].annotation) == PRECISIONS
