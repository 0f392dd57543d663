from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from index.gallery import Gallery, GalleryConfig, Record, exact_topk
from tests.index.helpers import clustered, unit

DIM = 32
FAST = GalleryConfig(fsync=False)


def make_records(vectors: np.ndarray, prefix: str = "item", **meta: object) -> list[Record]:
    return [
        Record(f"{prefix}{i}", v[None], {"group": i % 3, **meta}) for i, v in enumerate(vectors)
    ]


def exact_scores(gallery: Gallery, q: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Every item's score for each query (its best vector), in float64: ``ids, [Q, items]``."""
    ids, vecs, offsets = gallery.vectors_matrix()
    s = np.atleast_2d(q).astype(np.float64) @ vecs.astype(np.float64).T
    return ids, np.maximum.reduceat(s, offsets[:-1], axis=1)


def brute_force(gallery: Gallery, q: np.ndarray, k: int) -> list[list[str]]:
    ids, best = exact_scores(gallery, q)
    return [[ids[i] for i in np.argsort(-row, kind="stable")[:k]] for row in best]


TIE = 1e-6  # float32 scores: FAISS and BLAS sum in other orders, so near-ties may swap


def assert_exact_top_k(gallery: Gallery, q: np.ndarray, hits: list, k: int) -> None:
    """``hits`` are the exact top ``k`` up to float32 rounding: each hit's score is its item's
    float64 score, they come best first, and their scores are the ``k`` best there are (so an
    order may differ from the float64 one only between items scoring within TIE)."""
    ids, best = exact_scores(gallery, q)
    for row, exact in zip(hits, best, strict=True):
        by_id = dict(zip(ids, exact, strict=True))
        got = np.array([by_id[h.id] for h in row])
        assert len(row) == k and len({h.id for h in row}) == k
        np.testing.assert_allclose([h.score for h in row], got, atol=TIE)
        assert (np.diff(got) <= TIE).all()  # best first
        np.testing.assert_allclose(got, np.sort(exact)[::-1][:k], atol=TIE)


def test_upsert_search_get_remove(tmp_path: Path) -> None:
    x = clustered(500, DIM)
    g = Gallery(tmp_path, DIM, config=FAST)
    assert g.upsert(make_records(x)) == 500
    assert len(g) == 500 and g.version == 1 and g.factory == "Flat"
    hits = g.search(x[:5], k=10)
    assert [h[0].id for h in hits] == [f"item{i}" for i in range(5)]
    assert hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert_exact_top_k(g, x[:5], hits, 10)
    rec = g.get("item7")
    assert rec is not None and np.allclose(rec.vectors[0], x[7]) and rec.metadata["group"] == 1
    assert g.remove(["item0", "nope"]) == 1 and g.version == 2
    assert g.get("item0") is None and "item0" not in [h.id for h in g.search(x[0], 10)[0]]
    g.close()


def test_same_hash_is_noop_and_new_content_replaces(tmp_path: Path) -> None:
    x = clustered(50, DIM)
    g = Gallery(tmp_path, DIM, config=FAST)
    g.upsert(make_records(x))
    assert g.upsert(make_records(x)) == 0 and g.version == 1
    g.upsert([Record("item3", x[40][None], {"group": 9})])
    assert g.version == 2 and len(g) == 50
    top = g.search(x[40], k=2)[0]
    assert {h.id for h in top} == {"item3", "item40"}  # old vector of item3 is gone
    assert g.search(x[3], k=1)[0][0].id != "item3"


def test_rejects_bad_vectors(tmp_path: Path) -> None:
    g = Gallery(tmp_path, DIM, config=FAST)
    with pytest.raises(ValueError, match="normalised"):
        g.upsert([Record("a", np.ones((1, DIM), np.float32))])
    with pytest.raises(ValueError, match=r"\[K,32\]"):
        g.upsert([Record("a", unit(np.ones((1, 8))))])
    assert len(g) == 0 and g.version == 0


def test_segments_dedup_and_winning_segment(tmp_path: Path) -> None:
    x = clustered(200, DIM, seed=1)
    g = Gallery(tmp_path, DIM, config=FAST)
    # 20 videos with 10 segments each
    recs = [
        Record(f"v{i}", x[i * 10 : (i + 1) * 10], {}, segments=[(j, j + 1.0) for j in range(10)])
        for i in range(20)
    ]
    g.upsert(recs)
    hits = g.search(x[37], k=5)[0]
    assert len({h.id for h in hits}) == 5  # one hit per item
    assert hits[0].id == "v3" and hits[0].segment == 7
    assert_exact_top_k(g, x[37][None], [hits], 5)


def test_filter_is_correct_when_few_match(tmp_path: Path) -> None:
    x = clustered(2000, DIM, seed=2)
    g = Gallery(tmp_path, DIM, config=FAST)
    recs = make_records(x)
    for i in (5, 900, 1500):
        recs[i].metadata["tenant"] = "rare"
    g.upsert(recs)
    hits = g.search(x[:3], k=10, filter={"tenant": "rare"})
    assert all(sorted(h.id for h in row) == ["item1500", "item5", "item900"] for row in hits)
    hits = g.search(x[:3], k=10, filter={"group": 1})
    ids, vecs, _ = g.vectors_matrix()
    ok = np.array([i for i, r in enumerate(ids) if g.get(r).metadata["group"] == 1])  # type: ignore[union-attr]
    truth = exact_topk(x[:3], vecs[ok], 10)[1]
    assert [[h.id for h in row] for row in hits] == [[ids[ok[j]] for j in r] for r in truth]


def test_persistence_snapshot_log_and_offset(tmp_path: Path) -> None:
    x = clustered(300, DIM, seed=3)
    g = Gallery(tmp_path, DIM, config=FAST)
    g.upsert(make_records(x[:100]), offset="1-0")
    g.snapshot()
    g.upsert(make_records(x[100:200], prefix="b"), offset="2-0")
    g.remove(["item1"], offset="3-0")
    version = g.version
    g.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.1.faiss", "log.1", "snapshot.1.bin"]
    g2 = Gallery(tmp_path, DIM, config=FAST)
    assert len(g2) == 199 and g2.version == version and g2.applied_offset == "3-0"
    assert g2.get("item1") is None and g2.get("b5") is not None
    assert g2.search(x[150], 1)[0][0].id == "b50"
    # offset-only upsert (nothing new) still advances the offset durably
    g2.upsert(make_records(x[:3]), offset="4-0")
    g2.close()
    assert Gallery(tmp_path, DIM, config=FAST).applied_offset == "4-0"


def test_auto_switches_to_hnsw_with_recall(tmp_path: Path) -> None:
    x = clustered(3000, DIM, seed=4)
    cfg = GalleryConfig(fsync=False, auto_threshold=2000, ef_search=4, recall_sample=100)
    g = Gallery(tmp_path, DIM, config=cfg)
    g.upsert(make_records(x[:1500]))
    assert g.factory == "Flat"
    g.upsert(make_records(x[1500:], prefix="b"))
    assert g.factory == "HNSW32" and g.index_params["efSearch"] >= 4
    rng = np.random.default_rng(0)
    q = unit(x[:100] + rng.normal(scale=0.1, size=(100, DIM)))
    truth = brute_force(g, q, 10)
    found = [[h.id for h in row] for row in g.search(q, 10)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, found, strict=True)])
    assert recall >= 0.95
    # HNSW cannot remove ids: removal uses tombstones, still invisible to search
    g.remove(["item0"])
    assert "item0" not in [h.id for h in g.search(x[0], 10)[0]]
    g.snapshot()
    g.close()
    g2 = Gallery(tmp_path, DIM, config=cfg)
    assert g2.factory == "HNSW32" and len(g2) == 2999
    assert "item0" not in [h.id for h in g2.search(x[0], 10)[0]]


def test_concurrent_search_and_upsert(tmp_path: Path) -> None:
    x = clustered(1200, DIM, seed=5)
    g = Gallery(tmp_path, DIM, config=FAST)
    g.upsert(make_records(x[:200]))
    errors: list[BaseException] = []

    def searcher() -> None:
        try:
            for _ in range(50):
                for row in g.search(x[:4], 5):
                    assert len(row) == 5
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(200, 1200, 100):
        g.upsert(make_records(x[i : i + 100], prefix=f"c{i}_"))
    for t in threads:
        t.join()
    assert not errors and len(g) == 1200
