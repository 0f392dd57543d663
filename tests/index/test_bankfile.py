"""Shipped querybank files: float16 on disk, unit float32 back, with the facts that travel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.bankfile import bank_filename, read_bank_file, write_bank_file
from tests.index.helpers import unit


def test_a_bank_file_round_trips_in_half_the_bytes(tmp_path: Path) -> None:
    v = unit(np.random.default_rng(0).normal(size=(50, 256)))
    texts = [f"caption {i}" for i in range(50)]
    path = tmp_path / bank_filename("m", "text")
    assert path.name == "m.querybank-text.safetensors"
    size = write_bank_file(
        path, v, texts, model="m", modality="text", weights_hash="h" * 64, source="test: 50"
    )
    assert size == path.stat().st_size and size < v.astype(np.float32).nbytes * 0.6
    bank = read_bank_file(path)
    assert (bank.model, bank.modality, bank.weights_hash, bank.source) == (
        "m",
        "text",
        "h" * 64,
        "test: 50",
    )
    assert bank.texts == texts and len(bank) == 50 and bank.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1.0, atol=1e-6)
    assert np.abs(bank.vectors - v).max() < 1e-3  # float16 rounding only
    # the same ranking of a query's neighbours
    q = v[:5]
    assert (
        np.argsort(-(q @ v.T), axis=1)[:, :5] == np.argsort(-(q @ bank.vectors.T), axis=1)[:, :5]
    ).all()


def test_bad_input_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="B=2"):
        write_bank_file(
            tmp_path / "x",
            np.ones((3, 4)),
            ["a", "b"],
            model="m",
            modality="text",
            weights_hash="h",
            source="",
        )
    from safetensors.numpy import save_file

    save_file({"weights": np.ones((2, 2), np.float32)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="not an xmodal querybank"):
        read_bank_file(tmp_path / "weights.safetensors")
