from __future__ import annotations

import numpy as np

from index.records import GalleryConfig
from index.vector_index import VectorIndex, auto_factory, auto_nlist, outgrown
from tests.index.helpers import clustered

CFG = GalleryConfig()


def test_auto_factory_single_vector_and_set_galleries() -> None:
    assert auto_factory(10_000, 512, CFG) == "Flat"
    assert auto_factory(100_000, 512, CFG) == "HNSW32"
    assert auto_factory(1_000_000, 1024, CFG) == "IVF4096,PQ64,RFlat"
    # set galleries: exact below set_auto_threshold slot vectors, IVF with fp16 lists above
    assert auto_factory(10_000, 512, CFG, num_vectors=4) == "Flat"
    assert auto_factory(40_000, 512, CFG, num_vectors=4) == "IVF2048,SQfp16"
    assert auto_factory(2_000_000, 512, CFG, num_vectors=4).endswith(",PQ64,RFlat")
    # lists keep at least 16 training vectors each
    assert all(n / auto_nlist(n, 8) >= 16 for n in (100, 5_000, 20_000, 40_000, 10**6))


def test_outgrown_only_grows() -> None:
    assert outgrown("Flat", "HNSW32") and outgrown("Flat", "IVF1024,SQfp16")
    assert outgrown("HNSW32", "IVF4096,PQ64,RFlat")
    assert not outgrown("HNSW32", "Flat") and not outgrown("HNSW32", "HNSW32")
    assert not outgrown("IVF4096,PQ64,RFlat", "HNSW32")
    assert outgrown("IVF1024,SQfp16", "IVF2048,SQfp16")  # lists 4x longer than at build
    assert not outgrown("IVF1024,SQfp16", "IVF1024,SQfp16")
    assert not outgrown("IVF2048,SQfp16", "IVF1024,SQfp16")


def test_deep_ivf_search_probes_enough_lists() -> None:
    x = clustered(4000, 16, seed=1)
    index = VectorIndex(16, "IVF64,Flat", use_gpu=False)
    index.train(x)
    index.add(np.arange(len(x), dtype=np.int64), x)
    index.set_param("nprobe", 1)  # one list holds ~60 vectors
    scores, ids = index.search(x[:3], 500)
    assert (ids >= 0).all()  # 500 results each, not one list's worth
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    assert index.params["nprobe"] == 1  # the tuned value is back after the search
    _, ids = index.search(x[:3], 10)
    assert (ids >= 0).all()


def test_ivf_removes_ids_again_and_again() -> None:
    x = clustered(2000, 16, seed=2)
    index = VectorIndex(16, "IVF32,SQfp16", use_gpu=False)
    index.add(np.arange(len(x), dtype=np.int64), x)  # trains on the first add
    for batch in ([0, 3, 6], [1], [2, 4], list(range(10, 200))):
        index.remove(batch)  # under IDMap2 the second call aborted the process
    gone = {0, 1, 2, 3, 4, 6, *range(10, 200)}
    assert index.ntotal == len(x) - len(gone) and not index.tombstones
    _, ids = index.search(x[:20], 50)
    assert not gone & set(ids.ravel().tolist())
