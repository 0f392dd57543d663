"""media.resolve_item: the one reading of an ingest item, shared by POST /ingest and the worker."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from service import media
from service.settings import IngestSettings
from tests.service.test_api_helpers import image_bytes


def test_every_source_of_the_same_content_has_the_same_hash(tmp_path: Path) -> None:
    settings = IngestSettings(media_root=tmp_path)
    (tmp_path / "t.txt").write_text("  a dog on the grass \n")
    raw = image_bytes(3)
    (tmp_path / "i.png").write_bytes(raw)
    by_text = media.resolve_item({"modality": "text", "text": "a dog on the grass"}, settings)
    by_path = media.resolve_item({"modality": "text", "path": "t.txt"}, settings)
    assert by_text.text == by_path.text == "a dog on the grass"
    assert by_text.content_hash == by_path.content_hash == media.content_hash("a dog on the grass")
    assert by_path.path == tmp_path / "t.txt"
    sources = [
        {"data": base64.b64encode(raw).decode()},  # as POST /ingest sends it
        {"path": "i.png"},
        {"content": raw},  # as the queue hands a spilled payload to the worker
    ]
    resolved = [media.resolve_item({"modality": "image", **s}, settings) for s in sources]
    assert {r.content_hash for r in resolved} == {media.content_hash(raw)}


@pytest.mark.parametrize(
    ("item", "status"),
    [
        ({"modality": "audio", "data": "AA=="}, 422),
        ({"modality": "image"}, 400),
        ({"modality": "image", "blob_missing": True}, 400),
        ({"modality": "text", "text": "   "}, 422),
        ({"modality": "image", "path": "../etc/passwd"}, 400),
    ],
)
def test_bad_items_raise_media_errors(item: dict[str, object], status: int, tmp_path: Path) -> None:
    with pytest.raises(media.MediaError) as err:
        media.resolve_item(item, IngestSettings(media_root=tmp_path))
    assert err.value.status == status
