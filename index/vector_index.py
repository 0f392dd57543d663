"""VectorIndex: a FAISS inner-product index over int64 vector ids, the ``"auto"`` factory
choice, and recall tuning of the query-time knobs (efSearch / nprobe / k_factor).

Compute only: it knows vectors and ids, not items; :class:`index.gallery.Gallery` maps
vector ids back to items.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np

from index.records import GalleryConfig

logger = logging.getLogger(__name__)

RECALL_MARGIN = 0.02  # tune above min_recall: the sample estimate is noisy
IVF_DEPTH_COVER = 2.0  # a deep IVF search probes lists holding this many times n vectors
MIN_TRAIN_PER_LIST = 16  # training vectors per IVF list at least (faiss warns under 39)
LISTS_PER_ROOT = 4  # IVF lists per sqrt(n) (faiss's guideline: 4 to 16)
SET_LISTS_PER_ROOT = 8  # set galleries: searches hundreds deep over many probes favour
# smaller lists (10k items x 4 slots: IVF2048/nprobe 128 beat IVF1024/128 2x at equal recall)
FAISS_DEFAULTS = {"efSearch": 16, "nprobe": 1}  # the knobs' values in a fresh faiss index


def set_search_threads(n: int) -> None:
    """OpenMP threads FAISS uses for work started on the *calling* thread (the OpenMP runtime
    keeps the setting per thread: call it in each thread, e.g. as a pool's initializer);
    0 leaves FAISS's default (one per core)."""
    if n > 0:
        faiss.omp_set_num_threads(n)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def auto_nlist(n_vectors: int, per_root: int = LISTS_PER_ROOT) -> int:
    """IVF list count for ``n_vectors``: the power of two nearest ``per_root * sqrt(n)``,
    halved until every list has ``MIN_TRAIN_PER_LIST`` training vectors."""
    nlist = int(2 ** round(math.log2(per_root * math.sqrt(max(1, n_vectors)))))
    while nlist > 1 and n_vectors < MIN_TRAIN_PER_LIST * nlist:
        nlist //= 2
    return nlist


def auto_factory(n_vectors: int, dim: int, config: GalleryConfig, num_vectors: int = 1) -> str:
    """The factory string ``"auto"`` resolves to for a gallery of ``n_vectors``.

    Set galleries (``num_vectors`` = K slot vectors per item) search every query slot
    hundreds of neighbours deep (the shortlist), which HNSW answers slowly; between
    ``set_auto_threshold`` and ``ivfpq_threshold`` they get an IVF index with fp16 lists
    (half the bytes scanned; the exact Smooth-Chamfer re-rank reads float32 slots).
    """
    if num_vectors > 1 and n_vectors < config.ivfpq_threshold:
        if n_vectors < config.set_auto_threshold:
            return "Flat"
        return f"IVF{auto_nlist(n_vectors, SET_LISTS_PER_ROOT)},SQfp16"
    if n_vectors < config.auto_threshold:
        return "Flat"
    if n_vectors < config.ivfpq_threshold:
        return "HNSW32"
    m = max(d for d in (64, 48, 32, 16, 8) if dim % d == 0) if dim % 8 == 0 else 8
    return f"IVF{auto_nlist(n_vectors)},PQ{m},RFlat"


def _size_rank(factory: str) -> int:
    """0 exact, 1 graph or uncompressed IVF, 2 IVF-PQ: the order "auto" grows in."""
    f = factory.upper()
    if "IVF" in f and re.search(r"\bPQ\d", f):
        return 2
    return 1 if "HNSW" in f or "IVF" in f else 0


def outgrown(current: str, wanted: str) -> bool:
    """Whether an "auto" gallery built as ``current`` should be rebuilt as ``wanted`` (what
    :func:`auto_factory` gives for its size now): a bigger index kind, or an IVF whose list
    count should at least double (lists grown 4x longer than at build)."""
    if _size_rank(wanted) != _size_rank(current):
        return _size_rank(wanted) > _size_rank(current)
    have, want = _factory_nlist(current), _factory_nlist(wanted)
    return have is not None and want is not None and want >= 2 * have


def _own_ids(factory: str) -> bool:
    """IVF indexes without a refine stage store int64 ids themselves and remove them; under
    ``IDMap2`` a second ``remove_ids`` aborts the process (faiss 1.15 asserts ``j ==
    ntotal``: IDMap2 renumbers its sequence numbers, the IVF lists keep the old ones)."""
    f = factory.upper()
    return "IVF" in f and "RFLAT" not in f and "REFINE" not in f


def _factory_nlist(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory.upper())
    return int(m.group(1)) if m else None


class VectorIndex:
    """FAISS inner-product index over int64 vector ids, with query-time knob tuning.

    Indexes that cannot remove vectors (HNSW, refined IVF) get tombstones: removed ids stay
    in FAISS and callers skip them; the owner rebuilds when tombstones pile up.
    """

    def __init__(self, dim: int, factory: str, use_gpu: bool | None = None) -> None:
        self.dim = dim
        self.factory = factory
        spec = factory if factory.startswith("IDMap") or _own_ids(factory) else f"IDMap2,{factory}"
        self.index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        self.tombstones: set[int] = set()
        self.params: dict[str, int] = {}
        self._can_remove = True
        self._gpu = bool(gpu_available() if use_gpu is None else use_gpu)
        if self._gpu and not gpu_available():
            raise RuntimeError("use_gpu=True but faiss has no GPU support or sees no GPU")
        self._gpu_res: Any = None
        self._nlist: int | None = None  # IVF list count, read once

    @property
    def kind(self) -> str:
        f = self.factory.upper()
        return "hnsw" if "HNSW" in f else "ivf" if "IVF" in f else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, x: np.ndarray) -> None:
        try:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
            # polysemous training costs minutes and only helps Hamming filtering, unused here
            if hasattr(ivf, "do_polysemous_training"):
                ivf.do_polysemous_training = False
            ivf.cp.min_points_per_centroid = MIN_TRAIN_PER_LIST  # type: ignore[attr-defined]
        except RuntimeError:
            pass
        self.index.train(np.ascontiguousarray(x, dtype=np.float32))
        self._maybe_to_gpu()

    def _maybe_to_gpu(self) -> None:
        # HNSW has no GPU implementation; Flat and IVF move after training.
        if self._gpu and self.kind != "hnsw" and self.is_trained and self._gpu_res is None:
            self._gpu_res = faiss.StandardGpuResources()  # type: ignore[attr-defined]
            self.index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)  # type: ignore[attr-defined]

    def add(self, vids: np.ndarray, x: np.ndarray) -> None:
        if not self.is_trained:
            self.train(x)
        self._maybe_to_gpu()
        self.index.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), vids.astype(np.int64))

    def remove(self, vids: Iterable[int]) -> None:
        ids = np.fromiter(vids, dtype=np.int64)
        if len(ids) == 0:
            return
        if self._can_remove:
            try:
                self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
                return
            except RuntimeError:
                logger.info("index %s cannot remove ids; using tombstones", self.factory)
                self._can_remove = False
        self.tombstones.update(int(i) for i in ids)

    def restore_tombstones(self, vids: Iterable[int]) -> None:
        """Mark ``vids`` removed, as a snapshot recorded them (no FAISS removal is tried)."""
        self.tombstones = {int(i) for i in vids}
        if self.tombstones:
            self._can_remove = False

    def set_param(self, name: str, value: int) -> None:
        if name == "k_factor":  # ParameterSpace does not reach a refine index under IDMap2
            inner = faiss.downcast_index(getattr(self.index, "index", self.index))
            if not hasattr(inner, "k_factor"):
                raise ValueError(f"index {self.factory} has no k_factor")
            inner.k_factor = value
        else:
            faiss.ParameterSpace().set_index_parameter(self.index, name, value)
        self.params[name] = value

    def search(self, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = max(1, min(n, self.ntotal))
        knob, floor = self._depth_floor(n)
        if floor is not None:
            faiss.ParameterSpace().set_index_parameter(self.index, knob, floor)
        scores, ids = self.index.search(np.ascontiguousarray(x, dtype=np.float32), n)
        if floor is not None:
            faiss.ParameterSpace().set_index_parameter(
                self.index, knob, self.params.get(knob, FAISS_DEFAULTS[knob])
            )
        return scores, ids

    def _depth_floor(self, n: int) -> tuple[str, int | None]:
        """The query-time knob to raise for a search ``n`` results deep, and its value (None:
        keep the tuned one). efSearch below ``n`` makes HNSW return fewer than ``n`` results;
        IVF lists probed that hold fewer than ``IVF_DEPTH_COVER * n`` vectors do too, or
        return a poor tail."""
        if self.kind == "hnsw":
            return "efSearch", max(self.params.get("efSearch", FAISS_DEFAULTS["efSearch"]), n)
        if self.kind == "ivf":
            if self._nlist is None:
                self._nlist = _ivf_nlist(self.index)
            per_list = max(1.0, self.ntotal / self._nlist)
            need = min(self._nlist, math.ceil(IVF_DEPTH_COVER * n / per_list))
            if need > self.params.get("nprobe", FAISS_DEFAULTS["nprobe"]):
                return "nprobe", need
        return "", None

    def serialize(self) -> np.ndarray:
        index = self.index
        if self._gpu_res is not None:
            index = faiss.index_gpu_to_cpu(index)  # type: ignore[attr-defined]
        return faiss.serialize_index(index)

    @classmethod
    def deserialize(
        cls, data: np.ndarray, dim: int, factory: str, use_gpu: bool | None = None
    ) -> VectorIndex:
        self = cls.__new__(cls)
        self.dim = dim
        self.factory = factory
        self.index = faiss.deserialize_index(data)
        self.tombstones = set()
        self.params = {}
        self._can_remove = True
        self._gpu = bool(gpu_available() if use_gpu is None else use_gpu)
        self._gpu_res = None
        self._nlist = None
        self._maybe_to_gpu()
        return self

    def tune(
        self,
        vids: np.ndarray,
        vectors: np.ndarray,
        config: GalleryConfig,
        seed: int = 0,
        depth: int = 10,
        min_recall: float | None = None,
    ) -> float:
        """Raise efSearch / nprobe (and k_factor) until recall@depth vs exact ≥ min_recall.

        ``vectors [N,D]`` are the live vectors under ``vids``; queries are a sample of them
        with small noise (exact duplicates would make recall trivially 1). ``depth`` is 10
        for single vectors and ``10 K`` for set galleries (the slots of the 10 best items);
        ``min_recall`` defaults to ``config.min_recall``. Returns the recall.
        """
        if self.kind == "flat" or len(vids) == 0:
            return 1.0
        rng = np.random.default_rng(seed)
        nq = min(config.recall_sample, len(vids))
        q = vectors[rng.choice(len(vids), nq, replace=False)]
        # cross-modal queries sit far from gallery points (cosine ~0.3-0.7): noise of norm ~1
        q = q + rng.normal(scale=1.0 / math.sqrt(self.dim), size=q.shape).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        k = min(depth, len(vids))
        truth = exact_topk(q, vectors, k)[1]
        truth_ids = vids[truth]
        knob, start = (
            ("efSearch", config.ef_search) if self.kind == "hnsw" else ("nprobe", config.nprobe)
        )
        value, recall = start, 0.0
        floor = config.min_recall if min_recall is None else min_recall
        target = min(1.0, floor + RECALL_MARGIN)
        limit = 4096 if knob == "efSearch" else max(start, _ivf_nlist(self.index))
        refine = "RFLAT" in self.factory.upper() or "REFINE" in self.factory.upper()
        k_factor = 4
        while True:
            self.set_param(knob, value)
            if refine:  # exact re-ranking of k_factor * k PQ candidates
                self.set_param("k_factor", k_factor)
            _, found = self.search(q, k + len(self.tombstones))
            recall = float(
                np.mean(
                    [
                        len(set(truth_ids[i]) & set(found[i][: k + len(self.tombstones)])) / k
                        for i in range(nq)
                    ]
                )
            )
            if recall >= target:
                break
            if value < limit:
                value = min(limit, value * 2)
            elif refine and k_factor < 64:
                k_factor *= 2
            else:
                break
        logger.info("tuned %s: %s=%d recall@%d=%.3f", self.factory, knob, value, k, recall)
        if recall < floor:
            logger.warning("index %s reaches only recall@%d=%.3f", self.factory, k, recall)
        return recall


def _ivf_nlist(index: Any) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1


def exact_topk(
    q: np.ndarray, x: np.ndarray, k: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (scores, row indices), chunked over ``x``."""
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start in range(0, len(x), chunk):
        s = q @ x[start : start + chunk].T
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate(
            [best_i, np.arange(start, start + s.shape[1])[None].repeat(len(q), 0)], 1
        )
        kk = min(k, s_all.shape[1])
        part = np.argpartition(-s_all, kk - 1, axis=1)[:, :kk]
        best_s = np.take_along_axis(s_all, part, 1)
        best_i = np.take_along_axis(i_all, part, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
