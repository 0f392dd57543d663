from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from index.querybank import (
    FileQueryBankStore,
    QueryBank,
    QueryBankStore,
    RedisQueryBankStore,
    direction_of,
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


def test_directions_name_the_query_modality() -> None:
    assert {m: direction_of(m) for m in ("text", "image", "video")} == {
        "text": "t2v",
        "image": "i2t",
        "video": "v2t",
    }
    with pytest.raises(ValueError, match="querybank"):
        direction_of("vector")
    bank = QueryBank(rows(1), ["x"], "m", "i2t")
    assert bank.modality == "image"


def test_weights_hash_is_kept_by_replace_and_append(
    make_store: Callable[..., QueryBankStore],
) -> None:
    store = make_store()
    store.replace("m", "i2t", rows(2), ["a.jpg", "b.jpg"], weights_hash="abc123")
    store.append("m", "i2t", rows(1, 1), ["c.jpg"])
    bank = make_store().get("m", "i2t")
    assert bank is not None and bank.weights_hash == "abc123" and len(bank) == 3
    store.replace("m", "i2t", rows(1), ["d.jpg"])  # a build that does not know its weights
    assert store.get("m", "i2t").weights_hash is None  # type: ignore[union-attr]


def test_seed_writes_only_into_a_store_that_never_had_the_bank(
    make_store: Callable[..., QueryBankStore],
) -> None:
    store = make_store()
    assert store.seed("m", "t2v", rows(3), ["a", "b", "c"], weights_hash="w1") == 1
    assert store.seed("m", "t2v", rows(2, 1), ["x", "y"], weights_hash="w1") is None
    bank = store.get("m", "t2v")
    assert bank is not None and bank.texts == ["a", "b", "c"] and bank.weights_hash == "w1"
    # a bank the user built is never overwritten; nor is one the user deleted
    store.replace("m", "i2t", rows(2), ["user 1", "user 2"])
    assert store.seed("m", "i2t", rows(3), ["s1", "s2", "s3"]) is None
    assert store.get("m", "i2t").texts == ["user 1", "user 2"]  # type: ignore[union-attr]
    store.delete("m", "t2v")
    assert store.seed("m", "t2v", rows(3), ["a", "b", "c"]) is None
    assert store.get("m", "t2v") is None


def test_replicas_seeding_at_once_write_one_bank(
    make_store: Callable[..., QueryBankStore],
) -> None:
    stores = [make_store() for _ in range(6)]
    results: list[int | None] = [None] * len(stores)
    barrier = threading.Barrier(len(stores))

    def start(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].seed("m", "t2v", rows(4, i), [f"r{i} {j}" for j in range(4)])

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1 and results[winners[0]] == 1
    bank = stores[0].get("m", "t2v")
    assert bank is not None and bank.version == 1
    assert bank.texts == [f"r{winners[0]} {j}" for j in range(4)]
