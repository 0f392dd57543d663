"""QB-Norm refits off the request path: the background refresher, the querybank version marker."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from index.querybank import FileQueryBankStore
from tests.service.test_api_helpers import make_settings, running


def _bank(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_file_store_version_comes_from_the_marker(tmp_path: Path) -> None:
    store = FileQueryBankStore(tmp_path, fsync=False)
    assert store.version("m", "t2v") == 0
    v1 = store.replace("m", "t2v", _bank(4, 8), [f"q{i}" for i in range(4)])
    v2 = store.append("m", "t2v", _bank(2, 8, seed=1), ["a", "b"])
    assert (v1, v2) == (1, 2)
    bank_file = tmp_path / "m.t2v.npz"
    marker = tmp_path / "m.t2v.version"
    # the bank is unreadable now; version() must not need it while the marker is current
    stat = bank_file.stat()
    bank_file.write_bytes(b"not an npz")
    os.utime(bank_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.version("m", "t2v") == 2
    # a marker older than the bank (a crash between the two writes) is not trusted
    store2 = FileQueryBankStore(tmp_path / "b", fsync=False)
    store2.replace("m", "t2v", _bank(3, 8), ["x", "y", "z"])
    (tmp_path / "b" / "m.t2v.version").write_text("99")
    old = (tmp_path / "b" / "m.t2v.npz").stat().st_mtime_ns
    os.utime(tmp_path / "b" / "m.t2v.version", ns=(old - 10**9, old - 10**9))
    assert store2.version("m", "t2v") == 1
    assert marker.read_text() == "2"


def test_a_bank_changed_elsewhere_is_refitted_in_the_background(model: Any, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with running(settings, model) as client:
        state = client.app.state.xmodal  # type: ignore[attr-defined]
        assert state.refresher is not None and state.normalizers == {}
        # another process (``xmodal querybank build``) writes the bank into the same store
        other = FileQueryBankStore(Path(settings.data_dir) / "querybank", fsync=False)
        version = other.replace(
            model.name,
            "t2v",
            _bank(20, model.embed_dim),
            [f"caption {i}" for i in range(20)],
        )
        deadline = time.monotonic() + 10
        while not state.normalizers:  # no request is made: only the refresher can fit
            assert time.monotonic() < deadline, "the refresher never picked up the new bank"
            time.sleep(0.05)
        assert {m: n.bank_version for m, n in state.normalizers["text"].items()} == {
            "image": version,
            "video": version,
        }
        r = client.post("/search", json={"text": "a dog", "targets": ["image"], "qbnorm": True})
        assert r.status_code == 200 and r.json()["querybank_version"] == version
        # POST /querybank answers after its refit: the answer's version is already served
        r = client.post("/querybank", json={"texts": ["a cat on a mat", "two dogs"]})
        assert r.status_code == 200
        assert state.serving_bank() == (22, r.json()["version"])
    assert not state.refresher._thread.is_alive()  # stopped at shutdown
