"""docs/CONFIG.md is the output of ``xmodal config --markdown`` (generated from Settings)."""

from __future__ import annotations

from pathlib import Path

from service.commands import config as config_cmd
from service.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFIG.md"


def test_committed_config_reference_is_the_generated_one() -> None:
    assert DOC.read_text() == config_cmd.markdown(), (
        "docs/CONFIG.md is stale: regenerate it with `xmodal config --markdown > docs/CONFIG.md`"
    )


def test_every_setting_is_documented_with_its_variable() -> None:
    variables = {row[1] for row in config_cmd.rows(Settings)}
    assert {"XMODAL_DATA_DIR", "XMODAL_WORKER__BATCH_SIZE", "XMODAL_AUTH__READ_KEYS"} <= variables
    assert "XMODAL_INGEST__MAX_BATCH_ITEMS" in variables
    text = DOC.read_text()
    for var in variables:
        assert f"`{var}`" in text
    # the comment beside a field becomes its description
    rows = {row[1]: row for row in config_cmd.rows(Settings)}
    assert rows["XMODAL_INGEST__MAX_BATCH_ITEMS"][4] == "items per POST /ingest"
    assert rows["XMODAL_INGEST__MAX_BATCH_ITEMS"][3] == "256"
