from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from index.gallery import Gallery, GalleryConfig, Record
from index.qbnorm import (
    QBNormalizer,
    QBNormConfig,
    _item_scores,
    _top_k,
    activation_set,
    dynamic_inverted_softmax,
    inverted_softmax,
    log_normalisers,
    normalised_scores,
    rank_agreement,
)
from tests.index.helpers import clustered, unit

DIM = 32


# A transcription of ioanacroi/qb-norm dynamic_inverted_softmax.py (qb_norm and helpers),
# kept verbatim in behaviour, including that it writes into its `test_test` argument.
def _ref_get_retrieved_videos(sims, k):  # type: ignore[no-untyped-def]
    argm = np.argsort(-sims, axis=1)
    topk = argm[:, :k].reshape(-1)
    return np.unique(topk)


def _ref_get_index_to_normalize(sims, videos):  # type: ignore[no-untyped-def]
    argm = np.argsort(-sims, axis=1)[:, 0]
    result = np.array(list(map(lambda x: x in videos, argm)))
    return np.nonzero(result)


def reference_qb_norm(train_test, test_test, k=1, beta=20):  # type: ignore[no-untyped-def]
    retrieved_videos = _ref_get_retrieved_videos(train_test, k)
    test_test_normalized = test_test
    train_test = np.exp(train_test * beta)
    test_test = np.exp(test_test * beta)
    normalizing_sum = np.sum(train_test, axis=0)
    index_for_normalizing = _ref_get_index_to_normalize(test_test, retrieved_videos)
    test_test_normalized[index_for_normalizing, :] = np.divide(
        test_test[index_for_normalizing, :], normalizing_sum
    )
    return test_test_normalized


def problem(g: int = 400, b: int = 300, q: int = 80, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    gallery = clustered(g, DIM, clusters=16, seed=seed)
    bank = unit(gallery[rng.integers(0, g, b)] + rng.normal(scale=0.2, size=(b, DIM)))
    queries = unit(gallery[rng.integers(0, g, q)] + rng.normal(scale=0.2, size=(q, DIM)))
    return gallery, bank, queries


@pytest.mark.parametrize("k,beta", [(1, 20.0), (3, 20.0), (1, 5.0), (2, 50.0)])
def test_dense_dis_ranks_like_reference_and_leaves_inputs(k: int, beta: float) -> None:
    gallery, bank, queries = problem(seed=k)
    sims = (queries @ gallery.T).astype(np.float64)
    bank_sims = (bank @ gallery.T).astype(np.float64)
    sims0, bank0 = sims.copy(), bank_sims.copy()
    ours = dynamic_inverted_softmax(sims, bank_sims, beta, k)
    np.testing.assert_array_equal(sims, sims0)
    np.testing.assert_array_equal(bank_sims, bank0)
    ref = reference_qb_norm(bank_sims.copy(), sims.copy(), k=k, beta=beta)
    assert np.array_equal(np.argsort(-ours, axis=1)[:, :50], np.argsort(-ref, axis=1)[:, :50])
    # both kinds of rows occur, so the test exercises the dynamic choice
    active = np.zeros(sims.shape[1], bool)
    active[activation_set(bank_sims, k)] = True
    normalised = active[np.argmax(sims, axis=1)]
    assert normalised.any() and (~normalised).any()
    np.testing.assert_array_equal(ours[~normalised], sims[~normalised])
    # the ratio form equals the reference values where both are finite
    ratio = dynamic_inverted_softmax(sims, bank_sims, beta, k, log_space=False)
    np.testing.assert_allclose(ratio, ref, rtol=1e-9)


def test_log_space_survives_huge_beta_and_scale() -> None:
    gallery, bank, queries = problem(seed=7)
    sims, bank_sims = queries @ gallery.T * 100.0, bank @ gallery.T * 100.0
    out = dynamic_inverted_softmax(sims, bank_sims, beta=1000.0)
    assert np.all(np.isfinite(out))
    out_is = inverted_softmax(sims, bank_sims, beta=1000.0)
    assert np.all(np.isfinite(out_is))
    # inverted softmax normalises every row: ranking = beta*s - L
    lse = np.log(np.exp(20 * bank_sims / 100).sum(0))
    np.testing.assert_allclose(
        inverted_softmax(sims / 100, bank_sims / 100, 20.0), 20 * sims / 100 - lse, atol=1e-5
    )


def test_serving_form_equals_dense_form(tmp_path: Path) -> None:
    gallery_vecs, bank, queries = problem(g=600, b=300, q=60, seed=11)
    g = Gallery(tmp_path, DIM, config=GalleryConfig(fsync=False))
    g.upsert([Record(f"i{i}", v[None]) for i, v in enumerate(gallery_vecs)])
    cfg = QBNormConfig(shortlist=1000)
    qb = QBNormalizer(bank, cfg, bank_version=3).fit(g)
    assert qb.key == (3, g.version)
    sims, bank_sims = queries @ gallery_vecs.T, bank @ gallery_vecs.T
    dense = dynamic_inverted_softmax(sims, bank_sims, cfg.beta, cfg.k)
    dense_top = [[f"i{j}" for j in np.argsort(-row, kind="stable")[:10]] for row in dense]
    served = qb.search(queries, 10)
    assert [[h.id for h in row] for row in served] == dense_top
    # raw and normalised scores are both returned; norm_score = s - L/beta on activated rows
    lse = np.log(np.exp(cfg.beta * bank_sims.astype(np.float64)).sum(0))
    for qi, row in enumerate(served):
        for h in row:
            j = int(h.id[1:])
            assert h.score == pytest.approx(sims[qi, j], abs=1e-5)
            if h.id == row[0].id or row[0].id in qb.active_ids:
                assert h.norm_score == pytest.approx(sims[qi, j] - lse[j] / cfg.beta, abs=1e-4)
    # the dense normalised scores are what the serving form returns, hit for hit
    norm = normalised_scores(sims, bank_sims, cfg.beta, cfg.k)
    for qi, row in enumerate(served):
        for h in row:
            assert h.norm_score == pytest.approx(norm[qi, int(h.id[1:])], abs=1e-4)
    # "is" and "off" modes
    is_dense = inverted_softmax(sims, bank_sims, cfg.beta)
    is_top = [[f"i{j}" for j in np.argsort(-row, kind="stable")[:10]] for row in is_dense]
    assert [[h.id for h in r] for r in qb.search(queries, 10, mode="is")] == is_top
    off = qb.search(queries, 10, mode="off")
    assert all(h.norm_score is None for r in off for h in r)
    assert rank_agreement(off, g.search(queries, 10)) == 1.0


def test_incremental_updates_match_a_fresh_fit(tmp_path: Path) -> None:
    gallery_vecs, bank, queries = problem(g=700, b=200, q=40, seed=5)
    g = Gallery(tmp_path, DIM, config=GalleryConfig(fsync=False))
    g.upsert([Record(f"i{i}", v[None]) for i, v in enumerate(gallery_vecs[:500])])
    qb = QBNormalizer(bank, QBNormConfig(k=2)).fit(g)
    active_before = set(qb.active_ids)
    g.upsert([Record(f"i{i}", v[None]) for i, v in enumerate(gallery_vecs[500:], start=500)])
    g.remove(sorted(active_before)[:30])  # removing hubs forces bank top-k refills
    g.upsert([Record("i3", gallery_vecs[650][None])])  # new content for an existing id
    assert qb.gallery_version == g.version
    fresh = QBNormalizer(bank, QBNormConfig(k=2)).fit(g, attach=False)
    assert qb.active_ids == fresh.active_ids
    for item_id in g.ids():
        assert qb.lognorm(item_id) == pytest.approx(fresh.lognorm(item_id), abs=1e-4)
    assert qb.lognorm(sorted(active_before)[0]) is None
    assert rank_agreement(qb.search(queries, 10), fresh.search(queries, 10)) == 1.0


def test_the_float64_bank_kept_for_updates_gives_the_same_bits(tmp_path: Path) -> None:
    """Normalisers keep their bank in float64 for upserts: the lognorms of a worker-sized
    upsert are bit for bit what scoring that batch against the float32 bank gave before."""
    gallery_vecs, bank, _ = problem(g=120, b=300, q=1, seed=9)
    g = Gallery(tmp_path, DIM, config=GalleryConfig(fsync=False))
    qb = QBNormalizer(bank, QBNormConfig(k=1)).fit(g)
    for start in range(0, 120, 32):
        batch = gallery_vecs[start : start + 32]
        g.upsert([Record(f"i{start + j}", v[None]) for j, v in enumerate(batch)])
        offsets = np.arange(len(batch) + 1)
        cached = _item_scores(bank, batch, offsets, bank.astype(np.float64))
        converted = _item_scores(bank, batch, offsets)  # the bank converted on the call
        assert np.array_equal(cached, converted)
        expected = log_normalisers(converted, qb.config.beta)
        got = [qb.lognorm(f"i{start + j}") for j in range(len(batch))]
        assert got == expected.tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_running_top_k_equals_a_full_sort_with_ties(tmp_path: Path, k: int) -> None:
    """Upserts merge only the bank rows a new item can enter; the running top-k is still
    exactly the full sort of every item's score (ties: the item registered first)."""
    gallery_vecs, bank, _ = problem(g=90, b=150, q=1, seed=3)
    gallery_vecs[40:50] = gallery_vecs[10:20]  # equal vectors: exact ties, later indices
    g = Gallery(tmp_path, DIM, config=GalleryConfig(fsync=False))
    qb = QBNormalizer(bank, QBNormConfig(k=k)).fit(g)
    for start in range(0, 90, 32):
        batch = gallery_vecs[start : start + 32]
        g.upsert([Record(f"i{start + j}", v[None]) for j, v in enumerate(batch)])
    g.remove(["i11", "i60"])  # some top-k entries die: their rows are refilled
    ids = g.ids()
    idx = np.array([g.item_index(i) for i in ids], dtype=np.int64)
    vecs = np.stack([g.get(i).vectors[0] for i in ids])
    full = _item_scores(bank, vecs, np.arange(len(ids) + 1))
    want_s, want_i = _top_k(full, np.broadcast_to(idx, full.shape), k)
    assert np.array_equal(qb._top_idx, want_i)
    assert np.array_equal(qb._top_scores, want_s)


def test_adaptive_shortlist_is_exact_and_small(tmp_path: Path) -> None:
    gallery_vecs, bank, queries = problem(g=3000, b=400, q=60, seed=21)
    g = Gallery(tmp_path, DIM, config=GalleryConfig(fsync=False))
    g.upsert([Record(f"i{i}", v[None]) for i, v in enumerate(gallery_vecs)])
    cfg = QBNormConfig(shortlist=3000)
    qb = QBNormalizer(bank, cfg).fit(g)
    sims, bank_sims = queries @ gallery_vecs.T, bank @ gallery_vecs.T
    for mode, dense in [
        ("dis", dynamic_inverted_softmax(sims, bank_sims, cfg.beta, cfg.k)),
        ("is", inverted_softmax(sims, bank_sims, cfg.beta)),
    ]:
        top = [[f"i{j}" for j in np.argsort(-row, kind="stable")[:10]] for row in dense]
        assert [[h.id for h in r] for r in qb.search(queries, 10, mode=mode)] == top
    assert qb.stats["exact"] == qb.stats["queries"] == 120
    assert qb.stats["candidates"] / qb.stats["queries"] < 3000  # never needed the whole gallery
    fixed = QBNormalizer(bank, QBNormConfig(shortlist=3000, adaptive=False)).fit(g, attach=False)
    assert rank_agreement(fixed.search(queries, 10), qb.search(queries, 10)) == 1.0
