"""Job state on both stores: transitions, derived job state, sticky terminal states."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.jobs import ItemUpdate, JobStore, LocalJobStore, RedisJobStore, job_state


@pytest.fixture(params=["redis", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    s: JobStore
    if request.param == "redis":
        s = RedisJobStore(request.getfixturevalue("redis_url"))
    else:
        s = LocalJobStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


def test_lifecycle(store: JobStore) -> None:
    assert store.get("nope") is None
    store.create("j1", ["a", "b", "c"])
    status = store.get("j1")
    assert status is not None and status.state == "queued"
    assert [(i.id, i.state, i.error) for i in status.items] == [
        ("a", "queued", None),
        ("b", "queued", None),
        ("c", "queued", None),
    ]
    store.set_state("j1", "a", "encoding")
    assert store.get("j1").state == "running"  # type: ignore[union-attr]
    store.set_states(
        [ItemUpdate("j1", "a", "indexed"), ItemUpdate("j1", "b", "failed", "corrupt JPEG")]
    )
    status = store.get("j1")
    assert status is not None and status.state == "running"
    assert status.items[1].error == "corrupt JPEG"
    store.set_state("j1", "c", "indexed")
    status = store.get("j1")
    assert status is not None and status.state == "done"
    assert status.model_dump()["items"][0] == {"id": "a", "state": "indexed", "error": None}


def test_all_failed_and_sticky_terminal_states(store: JobStore) -> None:
    store.create("j2", ["x", "y"])
    store.set_state("j2", "x", "failed", "bad")
    store.set_state("j2", "y", "indexed")
    store.set_state("j2", "y", "encoding")  # a redelivery must not move it back
    store.set_state("j2", "x", "queued")
    status = store.get("j2")
    assert status is not None
    assert [i.state for i in status.items] == ["failed", "indexed"]
    store.create("j3", ["z"])
    store.set_state("j3", "z", "failed", "unsupported format")
    assert store.get("j3").state == "failed"  # type: ignore[union-attr]
    # unknown job or item: ignored, not created
    store.set_state("ghost", "z", "indexed")
    store.set_state("j3", "ghost", "indexed")
    assert store.get("ghost") is None
    assert [i.id for i in store.get("j3").items] == ["z"]  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.set_state("j3", "z", "exploded")


def test_redis_jobs_expire(redis_url: str) -> None:
    store = RedisJobStore(redis_url, ttl_s=100)
    store.create("j", ["a"])
    assert 0 < store.redis.ttl(store.prefix + "j") <= 100


def test_job_state_rules() -> None:
    assert job_state(["queued", "queued"]) == "queued"
    assert job_state(["queued", "indexed"]) == "running"
    assert job_state(["failed", "indexed"]) == "done"
    assert job_state(["failed", "failed"]) == "failed"
    assert job_state([]) == "done"
