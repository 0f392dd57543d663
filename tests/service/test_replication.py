"""The vector log: replicas on separate data dirs converge, restart and catch up, detect gaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from index.gallery import Gallery, GalleryConfig, Record
from service.kinds import MODALITIES
from service.replication import (
    ReplicaApplier,
    ReplicationPublisher,
    decode_entry,
    encode_upsert,
    parse_offset,
)

DIM = 16


def galleries(root: Path) -> dict[str, Gallery]:
    cfg = GalleryConfig(fsync=False, snapshot_every=0)
    return {m: Gallery(root / m, DIM, 1, cfg) for m in MODALITIES}


def close(gs: dict[str, Gallery]) -> None:
    for g in gs.values():
        g.close()


def rec(item_id: str, seed: int, n: int = 1, **kw: object) -> Record:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Record(item_id, v, content_hash=f"h{seed}", **kw)  # type: ignore[arg-type]


def snapshot_of(gs: dict[str, Gallery]) -> dict[str, dict[str, tuple[str, bytes]]]:
    return {
        m: {r.id: (r.content_hash, r.vectors.tobytes()) for r in g.records()} for m, g in gs.items()
    }


def test_entry_roundtrip() -> None:
    r = rec("v1", 3, n=3, metadata={"a": "b"}, segments=[(0, 2), (2, 4), (4, 5.5)])
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode()
        for k, v in encode_upsert("video", r).items()
    }
    e = decode_entry(b"5-1", fields)
    assert e.op == "u" and e.modality == "video" and e.offset == "5-1"
    assert e.record is not None and e.record.segments == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.5)]
    np.testing.assert_array_equal(e.record.vectors, r.vectors)
    assert e.record.metadata == {"a": "b"} and e.record.content_hash == "h3"
    assert parse_offset("10-2") > parse_offset("9-99") > parse_offset(None)


def test_two_replicas_converge_and_a_restarted_one_catches_up(
    redis_url: str, tmp_path: Path
) -> None:
    pub = ReplicationPublisher(redis_url)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    ga, gb = galleries(a_dir), galleries(b_dir)
    ra, rb = ReplicaApplier(redis_url, ga, batch=3), ReplicaApplier(redis_url, gb, batch=7)

    pub.write({"image": [rec("i1", 1), rec("i2", 2)], "text": [rec("t1", 3)]})
    pub.write({"video": [rec("v1", 4, n=2, segments=[(0, 4), (4, 6)])]})
    pub.publish_delete(["i2"])
    pub.write({"image": [rec("i3", 5)], "text": [rec("t1", 6)]})  # t1 replaced
    assert pub.known_hashes(["i1", "i2", "t1"]) == {"i1": ("image", "h1"), "t1": ("text", "h6")}

    assert ra.catch_up() == 7 and rb.catch_up() == 7
    assert snapshot_of(ga) == snapshot_of(gb)
    assert sorted(ga["image"].ids()) == ["i1", "i3"] and ga["text"].get("t1").content_hash == "h6"  # type: ignore[union-attr]
    assert ra.position == rb.position == pub.last_offset() and ra.lag() == 0
    # every gallery carries the offset, even those the last entries did not touch
    assert {g.applied_offset for g in ga.values()} == {pub.last_offset()}
    q = ga["image"].get("i1").vectors  # type: ignore[union-attr]
    assert [h.id for h in ga["image"].search(q, k=2)[0]] == [
        h.id for h in gb["image"].search(q, k=2)[0]
    ]

    # replica A goes down; the log moves on (including a modality change of an id)
    ra.close()
    ga["image"].snapshot()
    close(ga)
    pub.write({"text": [rec("t2", 7)], "image": [rec("i4", 8)]})
    pub.write({"text": [rec("i1", 9)]})  # i1 is now a text item
    pub.publish_delete(["v1"])
    rb.catch_up()

    ga = galleries(a_dir)
    ra = ReplicaApplier(redis_url, ga)
    assert ra.catch_up() == 4  # only what it missed, not the whole log
    assert snapshot_of(ga) == snapshot_of(gb)
    assert "i1" not in ga["image"] and "i1" in ga["text"] and len(ga["video"]) == 0
    # replaying entries it already has changes nothing
    versions = {m: g.version for m, g in ga.items()}
    rows = ra.redis.xrange(ra.stream)
    ra.apply([decode_entry(sid, f) for sid, f in rows])
    assert {m: g.version for m, g in ga.items()} == versions
    assert snapshot_of(ga) == snapshot_of(gb)
    ra.close(), rb.close(), pub.close()
    close(ga), close(gb)


def test_background_applier_and_read_your_delete(redis_url: str, tmp_path: Path) -> None:
    pub = ReplicationPublisher(redis_url)
    gs = galleries(tmp_path)
    applier = ReplicaApplier(redis_url, gs, snapshot_interval_s=0.01).start(block_ms=50)
    try:
        offset = pub.write({"image": [rec("x", 1)]})
        assert offset is not None and applier.wait_for(offset, timeout=5)
        assert "x" in gs["image"]
        offset = pub.publish_delete(["x"])
        assert offset is not None and applier.wait_for(offset, timeout=5)
        assert "x" not in gs["image"]
        assert not applier.wait_for("99999999999999-0", timeout=0.05)
    finally:
        applier.close()
    # stop() snapshotted: a reopened gallery starts from the snapshot at the same offset
    offset_before = gs["image"].applied_offset
    close(gs)
    assert any((tmp_path / "image").glob("snapshot.*"))
    reopened = galleries(tmp_path)
    assert reopened["image"].applied_offset == offset_before
    close(reopened)
    pub.close()


def test_trimmed_log_is_detected(redis_url: str, tmp_path: Path) -> None:
    pub = ReplicationPublisher(redis_url)
    for i in range(5):
        pub.write({"text": [rec(f"t{i}", i)]})
    current = galleries(tmp_path / "current")
    ReplicaApplier(redis_url, current).catch_up()
    redis.Redis.from_url(redis_url).xtrim(pub.stream, maxlen=2, approximate=False)
    fresh = galleries(tmp_path / "fresh")
    applier = ReplicaApplier(redis_url, fresh)
    assert applier.gap  # it would miss t0..t2
    applier.close()
    up_to_date = ReplicaApplier(redis_url, current)
    assert not up_to_date.gap
    up_to_date.close()
    close(fresh), close(current)


@pytest.mark.parametrize("n", [0])
def test_empty_writes_are_noops(redis_url: str, n: int) -> None:
    pub = ReplicationPublisher(redis_url)
    assert pub.write({"text": []}) is None and pub.publish_delete([]) is None
    assert pub.last_offset() is None and pub.known_hashes([]) == {}
    pub.close()
