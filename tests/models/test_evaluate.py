"""Retrieval metrics on hand-made similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluate import rank_i2t, rank_t2i, retrieval_metrics


def test_perfect_ranking_gives_100() -> None:
    c2i = np.repeat(np.arange(4), 5)  # 4 images x 5 captions
    sims = (c2i[None, :] == np.arange(4)[:, None]).astype(np.float32)
    m = retrieval_metrics(sims, c2i)
    assert m["i2t_r1"] == m["t2i_r1"] == 100.0
    assert m["rsum"] == 600.0
    assert m["medr_i2t"] == m["medr_t2i"] == 1.0


def test_known_ranks() -> None:
    # 3 images, one caption each; image i's caption ranked at position r_i (0-based).
    c2i = np.arange(3)
    sims = np.array(
        [
            [0.9, 0.1, 0.2],  # image 0: own caption first -> rank 0
            [0.8, 0.5, 0.7],  # image 1: own caption third -> rank 2
            [0.1, 0.9, 0.3],  # image 2: own caption second -> rank 1
        ],
        dtype=np.float32,
    )
    assert rank_i2t(sims, c2i).tolist() == [0, 2, 1]
    # Text-to-image: column j against all images; caption 1 scores 0.1, 0.5, 0.9 -> rank 1.
    assert rank_t2i(sims.T, c2i).tolist() == [0, 1, 1]
    m = retrieval_metrics(sims, c2i)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == 100.0
    assert m["medr_i2t"] == 2.0  # ranks 1, 3, 2 (1-based) -> median 2
    assert m["medr_t2i"] == 2.0  # ranks 1, 2, 2


def test_i2t_uses_the_best_of_several_captions() -> None:
    c2i = np.array([0, 0, 0, 1])  # image 0 has three captions, image 1 one
    sims = np.array([[0.1, 0.2, 0.8, 0.9], [0.5, 0.6, 0.0, 0.7]], dtype=np.float32)
    # Image 0: best own caption 0.8 beaten only by image 1's caption (0.9) -> rank 1.
    # Image 1: own caption 0.7 is the top -> rank 0.
    assert rank_i2t(sims, c2i).tolist() == [1, 0]
    assert rank_t2i(sims.T, c2i).tolist() == [1, 1, 0, 1]  # caption 3: 0.9 (image 0) > 0.7


def test_blocks_do_not_change_ranks() -> None:
    rng = np.random.default_rng(0)
    c2i = np.repeat(np.arange(50), 3)
    sims = rng.standard_normal((50, 150)).astype(np.float32)
    assert (rank_i2t(sims, c2i, block=7) == rank_i2t(sims, c2i, block=1000)).all()
    assert (rank_t2i(sims.T, c2i, block=11) == rank_t2i(sims.T, c2i, block=1000)).all()
    # Reference: full argsort.
    ref = []
    for i in range(50):
        order = np.argsort(-sims[i])
        ref.append(int(np.flatnonzero(c2i[order] == i).min()))
    assert rank_i2t(sims, c2i).tolist() == ref


def test_renormalised_t2i_scores_are_used() -> None:
    c2i = np.arange(2)
    sims = np.array([[0.9, 0.8], [0.1, 0.2]], dtype=np.float32)  # caption 1 prefers image 0
    plain = retrieval_metrics(sims, c2i)
    assert plain["t2i_r1"] == 50.0
    fixed = retrieval_metrics(sims, c2i, sims_t2i=np.eye(2, dtype=np.float32))
    assert fixed["t2i_r1"] == 100.0 and fixed["i2t_r1"] == plain["i2t_r1"]
