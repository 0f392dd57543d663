"""The search layer's merge: best score first across modalities, ties by id, then the page."""

from __future__ import annotations

from dataclasses import dataclass

from service.search import merge_and_page


@dataclass
class _Hit:
    id: str


def test_merge_orders_by_score_then_id_filters_and_pages() -> None:
    found = [
        ("image", _Hit("b"), 0.5, 0.5, 0.3),
        ("video", _Hit("a"), 0.5, 0.4, None),
        ("image", _Hit("c"), 0.9, 0.9, 0.8),
        ("video", _Hit("d"), 0.1, 0.1, 0.05),
    ]
    ids = [row[1].id for row in merge_and_page(found, 0, 10, None)]  # type: ignore[arg-type]
    assert ids == ["c", "a", "b", "d"]
    page = merge_and_page(found, 1, 2, 0.2)  # type: ignore[arg-type]
    assert [row[1].id for row in page] == ["a", "b"]
    assert merge_and_page(found, 0, 10, 0.95) == []  # type: ignore[arg-type]
    assert [row[1].id for row in found] == ["b", "a", "c", "d"]  # the input is left as it was
    # min_probability: below it, or without a probability, a row goes
    page = merge_and_page(found, 0, 10, None, 0.1)  # type: ignore[arg-type]
    assert [row[1].id for row in page] == ["c", "b"]
