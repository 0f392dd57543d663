"""The shipped model configs state only what differs from models/config.py's defaults, and
still load to exactly the full configs they held before (tests/models/model_configs_full.json,
captured from the full JSON files when they were shortened)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.factory import CONFIG_DIR, get_model_config, list_models

FULL = json.loads((Path(__file__).parent / "model_configs_full.json").read_text())


def test_every_shipped_config_has_its_full_form() -> None:
    assert sorted(FULL) == list_models()


@pytest.mark.parametrize("name", sorted(FULL))
def test_short_config_loads_to_the_full_one(name: str) -> None:
    cfg = get_model_config(name)
    assert cfg.model_dump(mode="json") == FULL[name]
    assert cfg == ModelConfig.model_validate(FULL[name])


@pytest.mark.parametrize("name", sorted(FULL))
def test_short_config_states_only_differences(name: str) -> None:
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    defaults = ModelConfig(name=name).model_dump(mode="json")

    def differs(written: dict, default: dict, where: str) -> None:
        for key, value in written.items():
            if isinstance(value, dict):
                differs(value, default[key], f"{where}{key}.")
            else:
                assert value != default[key], f"{name}: {where}{key} repeats its default"

    differs({k: v for k, v in raw.items() if k != "name"}, defaults, "")
