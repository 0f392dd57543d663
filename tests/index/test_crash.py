"""Kill a writer at random moments; every acknowledged item must survive, none twice."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from index.gallery import Gallery, GalleryConfig

REPO = Path(__file__).resolve().parents[2]
DIM = 16

CHILD = """
import sys
import numpy as np
from index.gallery import Gallery, GalleryConfig, Record

path, prefix, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
g = Gallery(path, dim, config=GalleryConfig(snapshot_every=7))
rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
i = 0
while True:
    n = int(rng.integers(1, 20))
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = [f"{prefix}-{i + j}" for j in range(n)]
    g.upsert([Record(x, v[j:j + 1], {"n": i + j}) for j, x in enumerate(ids)])
    print(" ".join(ids), flush=True)  # acknowledged: the upsert returned
    i += n
"""


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rnd = random.Random(1234)
    acknowledged: set[str] = set()
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), f"r{round_}", str(DIM)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        # wait for the first acknowledgement (imports take a while), then kill at random
        first = proc.stdout.readline()
        assert first.endswith("\n"), proc.stderr.read() if proc.stderr else ""
        acknowledged.update(first.split())
        time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        for line in out.splitlines(keepends=True):
            if line.endswith("\n"):
                acknowledged.update(line.split())

        g = Gallery(tmp_path, DIM, config=GalleryConfig())
        ids = g.ids()
        assert len(ids) == len(set(ids))
        missing = acknowledged - set(ids)
        assert not missing, f"round {round_}: lost {sorted(missing)[:5]}"
        # none twice: exactly one indexed vector per item, and each finds itself once
        assert g._index.ntotal - len(g._index.tombstones) == len(ids)
        sample = rnd.sample(ids, min(20, len(ids)))
        q = np.stack([g.get(i).vectors[0] for i in sample])  # type: ignore[union-attr]
        for item_id, row in zip(sample, g.search(q, 3), strict=True):
            assert row[0].id == item_id and [h.id for h in row].count(item_id) == 1
        g.close()
    assert len(acknowledged) > 50
