"""Where a set-item search spends its time: the slot scan against the shortlist + re-rank.

Same gallery as ``bench/index.py --multivector`` (10k items of K=4 clustered 512-d slots,
the gallery's "auto" slot index unless ``--factory``). Per query it times
:func:`index.multivector.search_items` (shortlist 200) and, separately, the shortlist it
starts with (:meth:`Gallery.search_candidates` for the query's K slots as one group), and
prints p50 ms of each and of their difference (slot gather and Smooth-Chamfer re-rank).

    python bench/multivector_stages.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import clustered, unit  # noqa: E402

from index.gallery import Gallery, GalleryConfig, Record  # noqa: E402
from index.multivector import search_items  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--shortlist", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factory", default="auto", help="slot index (GalleryConfig.factory)")
    p.add_argument("--threads", type=int, default=1, help="FAISS and torch threads")
    p.add_argument("--json", action="store_true", help="print one JSON line (the default)")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    n, k, d = args.gallery, args.slots, args.dim
    items = unit(clustered(n, d, rng)[:, None, :] + rng.normal(0, 0.6 / math.sqrt(d), (n, k, d)))
    pick = rng.integers(0, n, args.queries)
    q = unit(items[pick] + rng.normal(scale=1.0 / math.sqrt(d), size=(args.queries, k, d)))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GalleryConfig(fsync=False, factory=args.factory)
        g = Gallery(Path(tmp), d, num_vectors=k, config=cfg)
        g.upsert([Record(f"s{i}", items[i], {}, f"h{i}") for i in range(n)])
        search_items(g, q[:1], 10, shortlist=args.shortlist)  # warm-up
        factory, params = g.factory, g.index_params
        whole, scan = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            g.search_candidates(q[i], args.shortlist, group=k)
            scan.append(time.perf_counter() - t)
            t = time.perf_counter()
            search_items(g, q[i : i + 1], 10, shortlist=args.shortlist)
            whole.append(time.perf_counter() - t)
        g.close()

    def p50(x: list[float] | np.ndarray) -> float:
        return round(float(np.percentile(x, 50)) * 1e3, 2)

    rest = np.array(whole) - np.array(scan)
    out = {"gallery": n, "factory": factory, "params": params, "shortlist": args.shortlist}
    out |= {"search_p50_ms": p50(whole)}
    out |= {"scan_p50_ms": p50(scan), "rest_p50_ms": p50(rest)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
