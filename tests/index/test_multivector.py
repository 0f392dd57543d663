from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.gallery import Gallery, GalleryConfig, Record
from index.multivector import brute_force_multivector, search_items, set_similarity
from tests.index.helpers import clustered, unit

DIM, K = 32, 4


def set_items(n: int, seed: int = 0) -> np.ndarray:
    """``n`` sets of K slots: each set around one cluster centre, slots spread around it."""
    rng = np.random.default_rng(seed)
    centres = clustered(n, DIM, clusters=64, spread=0.6, seed=seed)
    slots = centres[:, None, :] + rng.normal(scale=0.6 / np.sqrt(DIM), size=(n, K, DIM))
    return unit(slots)


def reference_smooth_chamfer(a: np.ndarray, b: np.ndarray, t: float = 16.0) -> np.ndarray:
    """The DivE formula pair by pair in float64 (the oracle; the index has no copy of it)."""
    out = np.zeros((len(a), len(b)))
    for n, x in enumerate(a.astype(np.float64)):
        for m, y in enumerate(b.astype(np.float64)):
            s = t * (x @ y.T)  # [K1,K2]
            out[n, m] = (np.log(np.exp(s).sum(1)).mean() + np.log(np.exp(s).sum(0)).mean()) / (
                2 * t
            )
    return out


def test_set_similarity_is_the_smooth_chamfer_formula() -> None:
    a, b = set_items(5, seed=1), set_items(7, seed=2)
    ref = reference_smooth_chamfer(a, b, 16.0)
    assert ref.shape == (5, 7)
    np.testing.assert_allclose(set_similarity(a, b, 16.0), ref, atol=1e-4)
    # identical sets score highest among themselves
    assert np.all(np.argmax(set_similarity(a, a), axis=1) == np.arange(5))


def test_shortlist_rerank_matches_brute_force_smooth_chamfer(tmp_path: Path) -> None:
    items = set_items(1500)
    g = Gallery(tmp_path, DIM, num_vectors=K, config=GalleryConfig(fsync=False))
    g.upsert([Record(f"s{i}", v, {"even": i % 2 == 0}) for i, v in enumerate(items)])
    rng = np.random.default_rng(3)
    queries = unit(items[:60] + rng.normal(scale=0.8 / np.sqrt(DIM), size=items[:60].shape))
    truth = brute_force_multivector(g, queries, 10)
    found = search_items(g, queries, 10, shortlist=100)
    recall = np.mean(
        [len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(truth, found, strict=True)]
    )
    assert recall >= 0.95, recall
    # scores are exact Smooth-Chamfer for every returned item
    assert found[0][0].score == pytest.approx(
        float(set_similarity(queries[:1], g.get(found[0][0].id).vectors[None])[0, 0]),  # type: ignore[union-attr]
        abs=1e-4,
    )
    # filters apply to set items too
    filtered = search_items(g, queries[:5], 5, filter={"even": True})
    assert all(int(h.id[1:]) % 2 == 0 for row in filtered for h in row)
    assert all(len(row) == 5 for row in filtered)
    with pytest.raises(ValueError, match="set items need 4 vectors"):
        g.upsert([Record("bad", items[0][:2])])


def test_batched_shortlist_scores_equal_per_item_scores() -> None:
    rng = np.random.default_rng(5)
    sets = unit(rng.normal(size=(300, K, DIM)))
    for k1 in (1, 3, K):
        query = unit(rng.normal(size=(k1, DIM)))
        batched = set_similarity(query[None], sets, 16.0)[0]
        per_item = [set_similarity(query[None], s[None], 16.0)[0, 0] for s in sets]
        np.testing.assert_allclose(batched, per_item, atol=1e-5, rtol=0)


def test_set_search_scores_exact_and_ties_go_to_the_item_added_first(tmp_path: Path) -> None:
    items = set_items(200, seed=4)
    g = Gallery(tmp_path, DIM, num_vectors=K, config=GalleryConfig(fsync=False))
    # s0 and s1 hold the same slots: equal scores everywhere, so s0 (added first) leads
    g.upsert([Record("s0", items[0]), Record("s1", items[0])])
    g.upsert([Record(f"s{i}", v) for i, v in enumerate(items[2:], start=2)])
    hits = search_items(g, items[:1], 5, shortlist=50)[0]
    assert [h.id for h in hits[:2]] == ["s0", "s1"]
    assert hits[0].score == hits[1].score
    for h in hits:  # every score is the per-item Smooth-Chamfer
        ref = set_similarity(items[:1], g.get(h.id).vectors[None], 16.0)[0, 0]  # type: ignore[union-attr]
        assert h.score == pytest.approx(float(ref), abs=1e-5)
    # the slot cache follows replacements and removals
    g.upsert([Record("s0", items[7])])
    g.remove(["s1"])
    hits = search_items(g, items[:1], 5, shortlist=50)[0]
    assert "s1" not in {h.id for h in hits}
    # the replaced s0 now holds s7's slots and counts as added after s7
    assert [h.id for h in search_items(g, items[7:8], 2, shortlist=50)[0]] == ["s7", "s0"]
