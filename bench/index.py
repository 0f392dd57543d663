"""FAISS index choices on this machine: build time, memory, latency p50/p99, recall@10.

    python bench/index.py --gallery 100000 --dim 512 --json

For each index (exact ``Flat``, ``HNSW32``, ``IVF-PQ`` and ``IVF-PQ`` with exact re-ranking
of a refined shortlist, ``RFlat``) the query-time knob (efSearch / nprobe) is tuned the way
the gallery does it at (re)build (:meth:`index.gallery.VectorIndex.tune`, target recall@10
>= --min-recall on a tuning sample), then measured on separate queries: recall@10 against
exact search, single-query latency (one query per call, ``--threads`` OpenMP threads),
build time (train + add + tune) and memory (the serialized index size). Synthetic data:
clustered L2-normalised vectors; queries are gallery points moved by noise of norm ~1
(cosine ~0.7 to their source, like cross-modal queries).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import clustered, unit  # noqa: E402

from index.gallery import GalleryConfig, VectorIndex, auto_factory, exact_topk  # noqa: E402
from index.multivector import search_items  # noqa: E402


def queries_near(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    d = x.shape[1]
    return unit(x[rng.integers(0, len(x), n)] + rng.normal(scale=1.0 / math.sqrt(d), size=(n, d)))


def ivfpq(n: int, dim: int, refine: bool) -> str:
    f = auto_factory(max(n, 1_000_000), dim, GalleryConfig())  # IVF{nlist},PQ{m},RFlat
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    f = f.replace(f.split(",")[0], f"IVF{nlist}")
    return f if refine else f.replace(",RFlat", "")


def bench_one(factory: str, x: np.ndarray, q: np.ndarray, truth: np.ndarray, args) -> dict:  # type: ignore[no-untyped-def]
    vids = np.arange(len(x), dtype=np.int64)
    cfg = GalleryConfig(min_recall=args.min_recall, recall_sample=args.tune_queries)
    t0 = time.perf_counter()
    index = VectorIndex(x.shape[1], factory, use_gpu=False)
    if not index.is_trained:
        rng = np.random.default_rng(1)
        index.train(x[rng.choice(len(x), min(len(x), args.train_sample), replace=False)])
    train_s = time.perf_counter() - t0
    index.add(vids, x)
    add_s = time.perf_counter() - t0 - train_s
    tune_recall = index.tune(vids, x, cfg, seed=7)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(args.threads)
    lat = []
    found = np.zeros((len(q), 10), np.int64)
    for i in range(len(q)):
        t = time.perf_counter()
        _, ids = index.search(q[i : i + 1], 10)
        lat.append(time.perf_counter() - t)
        found[i] = ids[0]
    recall = np.mean([len(set(truth[i]) & set(found[i])) / 10 for i in range(len(q))])
    return {
        "index": factory,
        "params": index.params,
        "build_s": round(build_s, 2),
        "train_s": round(train_s, 2),
        "add_s": round(add_s, 2),
        "memory_mb": round(len(index.serialize()) / 2**20, 1),
        "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3),
        "recall@10": round(float(recall), 4),
        "tune_recall@10": round(float(tune_recall), 4),
    }


def bench_multivector(args) -> dict:  # type: ignore[no-untyped-def]
    """Set items (K slots): max-of-max shortlist + Smooth-Chamfer re-rank vs brute force.

    The gallery's own slot index ("auto": IVF with fp16 lists at this size, nprobe tuned
    at build) at shortlists 50/100/200, and the same search over an exact ``Flat`` slot
    index at shortlist 200, all against brute-force Smooth-Chamfer in the same run
    (``brute_force_ms``: all queries in one batch, per query; ``brute_force_p50_ms``: one
    query per call, as the searches are timed).
    """
    import tempfile

    from index.gallery import Gallery, Record
    from index.multivector import brute_force_multivector, set_similarity

    rng = np.random.default_rng(args.seed)
    k_slots, dim = args.slots, args.dim
    centres = clustered(args.gallery, dim, rng)
    noise = rng.normal(scale=0.6 / math.sqrt(dim), size=(args.gallery, k_slots, dim))
    items = unit(centres[:, None, :] + noise)
    pick = rng.integers(0, args.gallery, args.queries)
    q = unit(
        items[pick] + rng.normal(scale=1.0 / math.sqrt(dim), size=(args.queries, k_slots, dim))
    )

    out: dict = {"gallery": args.gallery, "slots": k_slots, "dim": dim}
    with tempfile.TemporaryDirectory() as tmp:
        galleries = {}
        for name, factory in (("auto", "auto"), ("exact", "Flat")):
            t0 = time.perf_counter()
            g = Gallery(
                Path(tmp) / name,
                dim,
                num_vectors=k_slots,
                config=GalleryConfig(fsync=False, factory=factory),
            )
            for s in range(0, args.gallery, 20_000):
                g.upsert(
                    [
                        Record(f"s{i}", items[i], {}, f"h{i}")
                        for i in range(s, min(s + 20_000, args.gallery))
                    ]
                )
            galleries[name] = g
            out[f"{name}_slot_index"] = {
                "factory": g.factory,
                "params": g.index_params,
                "build_s": round(time.perf_counter() - t0, 2),
            }
        g = galleries["auto"]
        t0 = time.perf_counter()
        truth = brute_force_multivector(g, q, 10)
        out["brute_force_ms"] = round((time.perf_counter() - t0) / len(q) * 1e3, 2)
        ids, vectors, _ = g.vectors_matrix()
        all_items = vectors.reshape(len(ids), k_slots, dim)
        brute = []
        for i in range(len(q)):  # one query per call, like the searches below
            t = time.perf_counter()
            set_similarity(q[i : i + 1], all_items)
            brute.append(time.perf_counter() - t)
        out["brute_force_p50_ms"] = round(float(np.percentile(brute, 50)) * 1e3, 2)
        # (gallery, shortlist) runs take turns in blocks of 10 queries, so load drift hits all
        # alike while one run's scans do not evict the next one's working set every query
        runs = {f"shortlist_{n}": (g, n) for n in (50, 100, 200)}
        runs["exact_slot_index_shortlist_200"] = (galleries["exact"], 200)
        lat: dict[str, list[float]] = {name: [] for name in runs}
        found: dict[str, list] = {name: [] for name in runs}  # type: ignore[type-arg]
        for gal, n in runs.values():
            search_items(gal, q[:1], 10, shortlist=n)  # warm-up
        for block in range(0, len(q), 10):
            for name, (gal, n) in runs.items():
                for i in range(block, min(block + 10, len(q))):
                    t = time.perf_counter()
                    found[name].append(search_items(gal, q[i : i + 1], 10, shortlist=n)[0])
                    lat[name].append(time.perf_counter() - t)
        for name in runs:
            recall = np.mean(
                [
                    len({h.id for h in a} & {h.id for h in b}) / 10
                    for a, b in zip(truth, found[name], strict=True)
                ]
            )
            out[name] = {
                "recall@10": round(float(recall), 4),
                "p50_ms": round(float(np.percentile(lat[name], 50)) * 1e3, 2),
                "p99_ms": round(float(np.percentile(lat[name], 99)) * 1e3, 2),
            }
        for g in galleries.values():
            g.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--tune-queries", type=int, default=200)
    p.add_argument("--min-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1, help="FAISS (and torch) threads at query time")
    p.add_argument("--build-threads", type=int, default=2, help="FAISS threads for train/add")
    p.add_argument(
        "--indexes", default="Flat,HNSW32,IVF-PQ,IVF-PQ-RFlat", help="comma-separated subset"
    )
    p.add_argument("--train-sample", type=int, default=100_000, help="IVF-PQ training vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multivector", action="store_true", help="set-item recall benchmark instead")
    p.add_argument("--slots", type=int, default=4, help="--multivector: vectors per item")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--plot", type=Path, help="also write latency/throughput/recall bars (PNG)")
    p.add_argument("--replot", type=Path, help="only plot a saved --json output into --plot")
    args = p.parse_args()
    if args.replot is not None:
        from service.commands.plots import plot_index_bench

        plot_index_bench(json.loads(args.replot.read_text()), args.plot or Path("index.png"))
        return
    if args.multivector:
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)  # the Smooth-Chamfer maths runs in torch
        print(json.dumps(bench_multivector(args)))
        return

    rng = np.random.default_rng(args.seed)
    x = clustered(args.gallery, args.dim, rng)
    q = queries_near(x, args.queries, rng)
    truth = exact_topk(q, x, 10)[1]
    names = {
        "Flat": "Flat",
        "HNSW32": "HNSW32",
        "IVF-PQ": ivfpq(args.gallery, args.dim, refine=False),
        "IVF-PQ-RFlat": ivfpq(args.gallery, args.dim, refine=True),
    }
    results = []
    for name in args.indexes.split(","):
        faiss.omp_set_num_threads(args.build_threads)
        res = bench_one(names[name], x, q, truth, args)
        results.append(res)
        if not args.json:
            print(json.dumps(res), flush=True)
    out = {"gallery": args.gallery, "dim": args.dim, "queries": args.queries, "results": results}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    if args.plot is not None:
        from service.commands.plots import plot_index_bench

        plot_index_bench(out, args.plot)


if __name__ == "__main__":
    main()
