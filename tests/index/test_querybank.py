from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.querybank import (
    FileQueryBankStore,
    QueryBankStore,
    RedisQueryBankStore,
)
from tests.index.helpers import unit

DIM = 8


def rows(n: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(n, DIM)))


@pytest.fixture(params=["file", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., QueryBankStore]:
    if request.param == "file":
        return lambda cap=100: FileQueryBankStore(tmp_path / "qb", cap=cap, fsync=False)
    url = request.getfixturevalue("redis_url")
    return lambda cap=100: RedisQueryBankStore(url, prefix="test:qb", cap=cap)


def test_replace_get_version_and_a_second_client(make_store: Callable[..., QueryBankStore]) -> None:
    store = make_store()
    assert store.get("m", "t2v") is None and store.version("m", "t2v") == 0
    v = rows(5)
    assert store.replace("m", "t2v", v, [f"caption {i}" for i in range(5)]) == 1
    other = make_store()  # another replica / a restarted API process
    bank = other.get("m", "t2v")
    assert bank is not None and bank.version == 1 and len(bank) == 5
    np.testing.assert_array_equal(bank.vectors, v)
    assert bank.texts[2] == "caption 2" and bank.vectors.dtype == np.float32
    assert other.get("m", "v2t") is None and other.get("other-model", "t2v") is None
    assert store.replace("m", "t2v", rows(3, 1), ["a", "b", "c"]) == 2
    assert other.version("m", "t2v") == 2 and len(other.get("m", "t2v")) == 3  # type: ignore[arg-type]
    store.delete("m", "t2v")
    assert store.get("m", "t2v") is None and store.version("m", "t2v") == 3


def test_append_dedups_and_caps_keeping_the_base(make_store: Callable[..., QueryBankStore]) -> None:
    store = make_store(cap=10)
    store.replace("m", "t2v", rows(6), [f"base {i}" for i in range(6)])
    v = store.append("m", "t2v", rows(3, 1), ["Base 0", "new  one", "new one"])
    bank = store.get("m", "t2v")
    assert bank is not None and v == bank.version == 2
    assert bank.texts == [f"base {i}" for i in range(6)] + ["new  one"]  # de-duplicated
    assert store.append("m", "t2v", rows(1, 2), ["base 3"]) == 2  # nothing new: same version
    store.append("m", "t2v", rows(6, 3), [f"live {i}" for i in range(6)])
    bank = store.get("m", "t2v")
    assert bank is not None and len(bank) == 10
    assert bank.texts[:6] == [f"base {i}" for i in range(6)]  # the base stays
    assert bank.texts[6:] == ["live 2", "live 3", "live 4", "live 5"]  # oldest appended go
    with pytest.raises(ValueError, match="direction"):
        store.append("m", "sideways", rows(1), ["x"])
    with pytest.raises(ValueError, match="texts"):
        store.append("m", "t2v", rows(2), ["x"])


def test_concurrent_appends_are_atomic(make_store: Callable[..., QueryBankStore]) -> None:
    stores = [make_store(cap=1000) for _ in range(4)]
    stores[0].replace("m", "v2t", rows(1), ["seed"])

    def worker(w: int) -> None:
        for i in range(10):
            stores[w].append("m", "v2t", rows(1, w * 100 + i), [f"w{w} q{i}"])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bank = stores[1].get("m", "v2t")
    assert bank is not None and len(bank) == 41 and bank.version == 41
    assert len(set(bank.texts)) == 41
