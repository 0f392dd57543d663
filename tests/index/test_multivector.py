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


def recall_at_10(truth: list, found: list) -> float:  # type: ignore[type-arg]
    return float(
        np.mean(
            [
                len({h.id for h in a} & {h.id for h in b}) / 10
                for a, b in zip(truth, found, strict=True)
            ]
        )
    )


# a tiny set gallery past set_auto_threshold: "auto" builds the IVF slot index
IVF_CFG = GalleryConfig(fsync=False, set_auto_threshold=2000, recall_sample=100)


def test_approximate_slot_index_keeps_recall_vs_brute_force(tmp_path: Path) -> None:
    items = set_items(1500)  # 6,000 slot vectors
    rng = np.random.default_rng(3)
    queries = unit(items[:60] + rng.normal(scale=0.8 / np.sqrt(DIM), size=items[:60].shape))
    found = {}
    for name, cfg in (("ivf", IVF_CFG), ("exact", GalleryConfig(fsync=False, factory="Flat"))):
        g = Gallery(tmp_path / name, DIM, num_vectors=K, config=cfg)
        g.upsert([Record(f"s{i}", v) for i, v in enumerate(items)])
        found[name] = search_items(g, queries, 10, shortlist=100)
        if name == "ivf":
            assert g.factory.startswith("IVF") and g.factory.endswith(",SQfp16")
            assert g.index_params["nprobe"] >= IVF_CFG.nprobe
            truth = brute_force_multivector(g, queries, 10)
    assert recall_at_10(truth, found["ivf"]) >= recall_at_10(truth, found["exact"]) - 0.02
    assert recall_at_10(truth, found["ivf"]) >= 0.95
    # scores stay exact Smooth-Chamfer whatever drew the shortlist
    ivf_scores = {h.id: h.score for row in found["ivf"] for h in row}
    exact_scores = {h.id: h.score for row in found["exact"] for h in row}
    for item_id in ivf_scores.keys() & exact_scores.keys():
        assert ivf_scores[item_id] == pytest.approx(exact_scores[item_id], abs=1e-5)


def test_set_search_consistent_under_add_remove_replace_and_reload(tmp_path: Path) -> None:
    items = set_items(1200, seed=6)
    g = Gallery(tmp_path, DIM, num_vectors=K, config=IVF_CFG)
    g.upsert([Record(f"s{i}", v) for i, v in enumerate(items[:700])])
    assert g.factory.startswith("IVF")  # grew from Flat at 2,000 slot vectors
    g.snapshot()
    # after the snapshot (so only in the log): more items, removals, replacements
    g.upsert([Record(f"s{i}", v) for i, v in enumerate(items[700:1000], start=700)])
    g.remove([f"s{i}" for i in range(0, 100, 3)])
    g.upsert([Record(f"s{i}", items[1000 + i]) for i in range(1, 60, 3)])  # new slots
    removed = {f"s{i}" for i in range(0, 100, 3)}
    queries = unit(items[990:1060])  # replaced items' new slots and unchanged ones

    def check(gal: Gallery) -> list[list[tuple[str, float]]]:
        for r in gal.records():  # the slot cache row of every live item is its record
            idx = gal.item_index(r.id)
            assert idx is not None
            np.testing.assert_array_equal(gal.set_vectors(np.array([idx]))[0], r.vectors)
        hits = search_items(gal, queries, 10, shortlist=100)
        assert not removed & {h.id for row in hits for h in row}
        truth = brute_force_multivector(gal, queries, 10)
        assert recall_at_10(truth, hits) >= 0.95
        return [[(h.id, round(h.score, 5)) for h in row] for row in hits]

    before = check(g)
    # a replaced item is found by its new slots, at its own top
    assert search_items(g, items[1001:1002], 1, shortlist=50)[0][0].id == "s1"
    factory, params = g.factory, g.index_params
    g.close()
    g2 = Gallery(tmp_path, DIM, num_vectors=K, config=IVF_CFG)  # snapshot + log replay
    assert (g2.factory, g2.index_params, len(g2)) == (factory, params, 1000 - len(removed))
    assert check(g2) == before


def test_group_candidates_are_the_exact_max_of_max_top_n(tmp_path: Path) -> None:
    items = set_items(300, seed=8)
    g = Gallery(tmp_path, DIM, num_vectors=K, config=GalleryConfig(fsync=False))
    g.upsert([Record(f"s{i}", v, {"even": i % 2 == 0}) for i, v in enumerate(items)])
    assert g.factory == "Flat"
    rng = np.random.default_rng(9)
    queries = unit(items[:5] + rng.normal(scale=0.8 / np.sqrt(DIM), size=items[:5].shape))
    for flt in (None, {"even": True}):
        cands = g.search_candidates(queries.reshape(-1, DIM), 40, flt, group=K)
        assert len(cands) == len(queries)
        keep = np.array([flt is None or i % 2 == 0 for i in range(len(items))])
        for q, c in zip(queries, cands, strict=True):
            mom = np.einsum("kd,nld->nkl", q, items).max(axis=(1, 2))  # [items]
            mom[~keep] = -np.inf
            want = np.lexsort((np.arange(len(items)), -mom))[:40]
            np.testing.assert_array_equal(c.idx, want)
            np.testing.assert_allclose(c.scores, mom[want], atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        g.search_candidates(queries.reshape(-1, DIM)[:6], 10, group=K)
