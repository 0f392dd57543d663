"""QB-Norm cost: our serving normaliser vs the dense reference computation, in one run.

    python bench/qbnorm.py --gallery 100000 --bank 5000 --dim 512 --json

"ours": a :class:`index.qbnorm.QBNormalizer` fitted once (per-item log-normalisers and
activation set precomputed), then per query: gallery search of a ``--shortlist`` and
normalisation of that shortlist. "dense": per call, the bank x gallery and query x gallery
similarities are recomputed and :func:`index.qbnorm.dynamic_inverted_softmax` runs over the
whole ``[Q,G]`` (what evaluation code does). "plain": the gallery search alone (top-k, no
QB-Norm), to show QB-Norm's overhead over plain search. Latencies are per query (one query
per call), FAISS on ``--threads`` OpenMP threads; peak memory is the largest numpy
allocation total during the calls (tracemalloc).
rank_agreement: fraction of queries whose top-10 ids equal the dense form's. Latencies are
medians over the queries (plain and ours interleaved per query, so machine load hits both);
ours_peak_mb includes the precomputed state (normalisers, activation set, bank top-k), not
the gallery index, which plain search needs too.

Synthetic data: clustered, L2-normalised gallery; bank and queries are noisy gallery points.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import clustered, unit  # noqa: E402

from index.gallery import Gallery, GalleryConfig, Record  # noqa: E402
from index.qbnorm import QBNormalizer, QBNormConfig, dynamic_inverted_softmax  # noqa: E402


def near(x: np.ndarray, n: int, rng: np.random.Generator, scale: float = 0.8) -> np.ndarray:
    d = x.shape[1]
    return unit(x[rng.integers(0, len(x), n)] + rng.normal(scale=scale / np.sqrt(d), size=(n, d)))


def peak_mb(fn):  # type: ignore[no-untyped-def]
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, elapsed, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--bank", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=100, help="queries timed for ours/plain")
    p.add_argument("--dense-queries", type=int, default=3, help="calls timed for dense")
    p.add_argument("--shortlist", type=int, default=1000)
    p.add_argument(
        "--shortlists", default="", help="also time/compare these shortlists, e.g. 50,100,300"
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--factory", default="Flat", help='gallery index ("Flat" isolates QB-Norm)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (per query)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--plot", type=Path, help="also write latency/throughput bars (PNG)")
    p.add_argument(
        "--replot", type=Path, nargs="+", help="only plot saved --json outputs into --plot"
    )
    args = p.parse_args()
    if args.replot:
        from service.commands.plots import plot_qbnorm_bench

        saved = [json.loads(f.read_text()) for f in args.replot]
        plot_qbnorm_bench(saved, args.plot or Path("qbnorm.png"))
        return
    faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    x = clustered(args.gallery, args.dim, rng)
    bank = near(x, args.bank, rng)
    queries = near(x, args.queries, rng)
    tmp = tempfile.TemporaryDirectory()
    cfg = GalleryConfig(factory=args.factory, fsync=False, snapshot_every=0)
    g = Gallery(Path(tmp.name), args.dim, config=cfg)
    t0 = time.perf_counter()
    for s in range(0, len(x), 50_000):
        g.upsert(
            [Record(f"i{i}", x[i : i + 1], {}, f"h{i}") for i in range(s, min(s + 50_000, len(x)))]
        )
    build_s = time.perf_counter() - t0

    qcfg = QBNormConfig(shortlist=args.shortlist)
    t0 = time.perf_counter()
    qb = QBNormalizer(bank, qcfg).fit(g)
    fit_s = time.perf_counter() - t0
    # the precomputed state counts towards ours: normalisers, activation mask, bank top-k
    qb_state_mb = (
        qb._lognorm.nbytes + qb._active.nbytes + qb._top_idx.nbytes + qb._top_scores.nbytes
    ) / 2**20

    def plain(q: np.ndarray) -> list:  # type: ignore[type-arg]
        return g.search(q[None], args.k)[0]

    def ours(q: np.ndarray, n: int | None = None) -> list:  # type: ignore[type-arg]
        return qb.search(q[None], args.k, shortlist=n)[0]

    def dense(q: np.ndarray) -> np.ndarray:
        bank_sims = bank @ x.T  # [B,G], recomputed per call
        kept["bank_sims"] = bank_sims
        out = dynamic_inverted_softmax(q[None] @ x.T, bank_sims, qcfg.beta, qcfg.k)
        return np.argsort(-out[0], kind="stable")[: args.k]

    kept: dict[str, np.ndarray] = {}
    shortlists = [args.shortlist] + [int(v) for v in args.shortlists.split(",") if v]
    for q in queries[:5]:  # warm-up
        plain(q)
        ours(q)
    qb.stats = {"queries": 0, "candidates": 0, "exact": 0}
    # interleave plain and ours per query so machine load affects both alike
    times: dict[str, list[float]] = {"plain": [], **{f"ours{n}": [] for n in shortlists}}
    ours_hits: dict[int, list] = {n: [] for n in shortlists}  # type: ignore[type-arg]
    for q in queries:
        t0 = time.perf_counter()
        plain(q)
        times["plain"].append(time.perf_counter() - t0)
        for n in shortlists:
            t0 = time.perf_counter()
            ours_hits[n].append(ours(q, n))
            times[f"ours{n}"].append(time.perf_counter() - t0)
    dense_times, dense_tops = [], []
    for q in queries[: args.dense_queries]:
        t0 = time.perf_counter()
        dense_tops.append(dense(q))
        dense_times.append(time.perf_counter() - t0)
    # shortlist use of the default configuration (the first timed shortlist)
    n_default = len(queries)
    mean_candidates = qb.stats["candidates"] / max(1, qb.stats["queries"])
    exact_frac = qb.stats["exact"] / max(1, qb.stats["queries"])
    # peak memory (tracemalloc, separate from timing since it slows allocation)
    _, _, ours_peak = peak_mb(lambda: [ours(q) for q in queries[:10]])
    _, _, dense_peak = peak_mb(lambda: dense(queries[0]))
    # agreement over every timed query: the dense form in one batch (not timed)
    dense_all = dynamic_inverted_softmax(queries @ x.T, kept.pop("bank_sims"), qcfg.beta, qcfg.k)
    tops_all = np.argsort(-dense_all, axis=1, kind="stable")[:, : args.k]

    def agreement(hits: list) -> float:  # type: ignore[type-arg]
        same = [[h.id for h in hits[i]] == [f"i{j}" for j in tops_all[i]] for i in range(len(hits))]
        return round(float(np.mean(same)), 4)

    def ms(v: list[float]) -> float:
        return round(float(np.median(v)) * 1e3, 3)

    plain_ms, ours_ms, dense_ms = (
        ms(times["plain"]),
        ms(times[f"ours{args.shortlist}"]),
        ms(dense_times),
    )
    by_shortlist = {
        n: {
            "ours_ms": ms(times[f"ours{n}"]),
            "overhead_vs_plain_pct": round(100 * (ms(times[f"ours{n}"]) / plain_ms - 1), 1),
            "rank_agreement": agreement(ours_hits[n]),
        }
        for n in shortlists[1:]
    }
    result = {
        "gallery": args.gallery,
        "bank": args.bank,
        "dim": args.dim,
        "shortlist": args.shortlist,
        "factory": g.factory,
        "ours_ms": round(ours_ms, 3),
        "dense_ms": round(dense_ms, 3),
        "speedup": round(dense_ms / ours_ms, 1),
        "plain_ms": round(plain_ms, 3),
        "overhead_vs_plain_pct": round(100 * (ours_ms / plain_ms - 1), 1),
        "ours_peak_mb": round(ours_peak + qb_state_mb, 2),
        "dense_peak_mb": round(dense_peak, 2),
        "rank_agreement": agreement(ours_hits[args.shortlist]),
        "ours_p99_ms": round(float(np.percentile(times[f"ours{args.shortlist}"], 99)) * 1e3, 3),
        "plain_p99_ms": round(float(np.percentile(times["plain"], 99)) * 1e3, 3),
        "fit_s": round(fit_s, 2),
        "build_s": round(build_s, 2),
        "activated_items": len(qb.active_ids),
        "by_shortlist": by_shortlist,
        "mean_candidates": round(mean_candidates, 1),
        "provably_exact_frac": round(exact_frac, 4),
        "timed_queries": n_default,
        "dense_calls": len(dense_times),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    if args.plot is not None:
        from service.commands.plots import plot_qbnorm_bench

        plot_qbnorm_bench([result], args.plot)
    g.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
