"""Resident memory of a gallery per vector, per index kind, and the largest gallery that fits.

    python bench/memory.py --json

Each index kind is measured in its own subprocess (a clean heap): a :class:`Gallery` (the
class the API serves from, so its records, id maps and FAISS index all count) with that
factory is filled with ``--sizes`` single-vector items of ``--dim`` float32 (the input
arrives and is dropped in chunks, so it is not counted), and the process's resident set
(``VmRSS`` in ``/proc/self/status``) is read after each size. Bytes per vector are the
slope between the two sizes (fixed costs such as IVF centroids fall out), reported per 1M
vectors; the largest gallery one machine serves is ``(--machine-gib - --headroom-gib) /
bytes per vector``, the headroom covering the model, the process and the OS.

Kinds: ``Flat`` (exact), ``HNSW32``, ``IVF-PQ-RFlat`` (what ``"auto"`` builds at 1M
vectors: ``IVF4096,PQ64,RFlat``, PQ codes plus the float vectors for exact re-ranking) and
``IVF-PQ`` (``IVF4096,PQ64``: 64 sub-quantizers x 8 bits = 64 B codes, no re-ranking
copy). IVF kinds are trained on the first chunk (``--train`` vectors).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import clustered  # noqa: E402

KINDS = {
    "Flat": "Flat",
    "HNSW32": "HNSW32",
    "IVF-PQ-RFlat": "IVF4096,PQ64,RFlat",
    "IVF-PQ": "IVF4096,PQ64",
}
GIB = 2**30


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(kind: str, sizes: list[int], dim: int, train: int, chunk: int) -> dict:
    """Fill one gallery of ``kind`` up to each of ``sizes``; RSS growth at each."""
    import faiss

    from index.gallery import Gallery, GalleryConfig, Record

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    factory = KINDS[kind]
    cfg = GalleryConfig(factory=factory, fsync=False, snapshot_every=0)
    out: dict = {"kind": kind, "factory": factory, "dim": dim, "rss_mb": {}, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        base = rss_bytes()
        t0 = time.perf_counter()
        g = Gallery(Path(tmp), dim, config=cfg)
        done = 0
        for size in sizes:
            while done < size:
                # the first chunk of an IVF kind is its training set
                n = min(train if done == 0 and "IVF" in factory else chunk, size - done)
                x = clustered(n, dim, rng)
                g.upsert(Record(f"i{done + j}", x[j], {}, f"h{done + j}") for j in range(n))
                done += n
                del x
            gc.collect()
            out["rss_mb"][size] = round((rss_bytes() - base) / 2**20, 1)
            out["seconds"][size] = round(time.perf_counter() - t0, 1)
            print(json.dumps({"kind": kind, "size": size, **out}), file=sys.stderr, flush=True)
        g.close()
    lo, hi = sizes[0], sizes[-1]
    per_vec = (out["rss_mb"][hi] - out["rss_mb"][lo]) * 2**20 / (hi - lo)
    out["bytes_per_vector"] = round(per_vec, 1)
    out["gib_per_1m"] = round(per_vec * 1e6 / GIB, 2)
    out["raw_vector_bytes"] = dim * 4
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    p.add_argument("--sizes", default="100000,200000", help="two gallery sizes (vectors)")
    p.add_argument("--dim", type=int, default=1024, help="the shipped model's dimension")
    p.add_argument("--train", type=int, default=70_000, help="IVF training vectors")
    p.add_argument("--chunk", type=int, default=20_000, help="vectors upserted per call")
    p.add_argument("--machine-gib", type=float, default=24.0)
    p.add_argument("--headroom-gib", type=float, default=3.0, help="model, process, OS")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one kind, here
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:
        print(json.dumps(measure(args.one, sizes, args.dim, args.train, args.chunk)))
        return
    results = []
    for kind in args.kinds.split(","):
        cmd = [sys.executable, __file__, "--one", kind, "--sizes", args.sizes]
        cmd += ["--dim", str(args.dim), "--train", str(args.train), "--chunk", str(args.chunk)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        res = json.loads(done.stdout.strip().splitlines()[-1])
        usable = (args.machine_gib - args.headroom_gib) * GIB
        res["max_gallery_vectors"] = int(usable / res["bytes_per_vector"])
        results.append(res)
        if not args.json:
            print(json.dumps(res), flush=True)
    out = {
        "dim": args.dim,
        "sizes": sizes,
        "machine_gib": args.machine_gib,
        "headroom_gib": args.headroom_gib,
        "results": results,
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
