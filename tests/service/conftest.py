"""Fixtures shared by the service tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="module")
def model() -> Any:
    """The tiny random model (no download): one per test module, as each module had."""
    from models import create_model

    return create_model("tiny-random", pretrained=False)
