"""Galleries: one modality's durable item store over a FAISS index.

A :class:`Gallery` holds :class:`Record` items (``K`` L2-normalised vectors each: one for an
image, one per segment for a video, ``K`` slots for a set-embedding model) and answers
item-level inner-product searches. Every vector is indexed under its own int64 id
(``IndexIDMap2``, or an IVF index's own ids); a vector id maps back to ``(item id, slot)``,
and a search keeps the best vector per item (remembering which segment won).

Durability: ``upsert``/``remove`` append one CRC-framed record to the write-ahead log and
fsync it before changing memory or returning, so an acknowledged change survives a crash at
any point. Snapshots (records + serialized FAISS index) are written atomically; the log is
rotated to a new generation first and old generations are deleted only after the snapshot
that covers them is durable. Start-up = newest snapshot + replay of the newer logs (a torn
final record is detected by its CRC and dropped; it was never acknowledged).

Files under ``path``: ``snapshot.<gen>.bin``, ``index.<gen>.faiss``, ``log.<gen>``.

This module is the orchestration only: the data types live in :mod:`index.records`, the
FAISS index and its tuning in :mod:`index.vector_index`, the file formats in
:mod:`index.log` and :mod:`index.snapshot`; set-item search is :mod:`index.multivector`, which
reads the gallery (never the other way round).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from index.log import WriteAheadLog, fsync_dir
from index.records import Candidates, GalleryConfig, Hit, Listener, Record, content_hash
from index.snapshot import (
    pack_change,
    read_index,
    read_snapshot,
    unpack_change,
    write_index,
    write_snapshot,
)
from index.vector_index import VectorIndex, auto_factory, exact_topk, gpu_available, outgrown

__all__ = [  # the data and index types stay importable from here, as before the split
    "Candidates",
    "Gallery",
    "GalleryConfig",
    "Hit",
    "Listener",
    "Record",
    "VectorIndex",
    "auto_factory",
    "content_hash",
    "exact_topk",
    "gpu_available",
]

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3  # |‖v‖ - 1| allowed for "L2-normalised" vectors


def _check_vectors(v: np.ndarray, dim: int, num_vectors: int, item_id: str) -> np.ndarray:
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"item {item_id!r}: vectors must be [K,{dim}], got {list(v.shape)}")
    if v.shape[0] == 0:
        raise ValueError(f"item {item_id!r}: at least one vector is required")
    if num_vectors > 1 and v.shape[0] != num_vectors:
        raise ValueError(
            f"item {item_id!r}: set items need {num_vectors} vectors, got {v.shape[0]}"
        )
    if not np.all(np.isfinite(v)):
        raise ValueError(f"item {item_id!r}: vectors contain NaN or inf")
    norms = np.linalg.norm(v, axis=1)
    if np.any(np.abs(norms - 1.0) > NORM_TOLERANCE):
        raise ValueError(
            f"item {item_id!r}: vectors must be L2-normalised (norms {norms.min():.4f}..)"
        )
    out = np.array(v, dtype=np.float32, order="C", copy=True)
    out.flags.writeable = False
    return out


def _matches(metadata: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    return flt is None or all(metadata.get(key) == value for key, value in flt.items())


class Gallery:
    """Durable, thread-safe item store for one modality (see the module docstring).

    Args:
        path: directory holding the snapshot, index and log files (created if missing).
        dim: vector dimension ``D``.
        num_vectors: ``K`` for set-embedding models (every item has exactly K slot vectors);
            1 for single-vector models, where video items may carry one vector per segment.
        config: index and durability knobs.
    """

    def __init__(
        self, path: Path, dim: int, num_vectors: int = 1, config: GalleryConfig | None = None
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.num_vectors = num_vectors
        self.config = config or GalleryConfig()
        self._lock = threading.RLock()
        self._items: dict[str, Record] = {}
        self._vids: dict[str, np.ndarray] = {}  # item id -> its vector ids
        # vector id -> (item index, slot) as arrays, so a search maps ids without Python loops
        self._vid_item = np.full(1024, -1, dtype=np.int64)
        self._vid_slot = np.zeros(1024, dtype=np.int32)
        self._item_idx: dict[str, int] = {}  # item id -> dense item index (new on replace)
        self._idx_id: list[str | None] = []  # item index -> item id (None once removed)
        self._n_live = 0  # live vectors
        # set models: slot vectors by dense item index, contiguous [capacity, K, D], written
        # as each item registers and zeroed when it goes (dense indexes are append-only, so
        # rows never move); the Smooth-Chamfer re-rank gathers its shortlist from here
        self._sets = np.zeros((0, num_vectors, dim), dtype=np.float32)
        self._next_vid = 0
        self._version = 0
        self.applied_offset: str | None = None
        self._gen = 0
        self._since_snapshot = 0
        self._listeners: list[Listener] = []
        self._index = self._new_index(0)
        self._log: WriteAheadLog
        self._open()

    # ---- properties -------------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        """The gallery's reentrant lock: holding it keeps records and index unchanged.

        For callers (e.g. QBNormalizer) that must read a consistent gallery across
        several calls; every write and search takes it too.
        """
        return self._lock  # type: ignore[return-value]

    @property
    def version(self) -> int:
        """Monotonic change counter (persisted; bumped once per applied upsert/remove)."""
        return self._version

    @property
    def factory(self) -> str:
        return self._index.factory

    @property
    def index_params(self) -> dict[str, int]:
        return dict(self._index.params)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def get(self, item_id: str) -> Record | None:
        return self._items.get(item_id)

    def records(self) -> list[Record]:
        """A consistent list of every record (the arrays are read-only, never mutated)."""
        with self._lock:
            return list(self._items.values())

    def iter_vectors(
        self, batch_items: int = 4096
    ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """Yield ``(ids, vectors [n_vec,D], offsets [len(ids)+1])`` batches over every item;
        item ``i``'s vectors are ``vectors[offsets[i]:offsets[i+1]]``."""
        records = self.records()
        for start in range(0, len(records), batch_items):
            chunk = records[start : start + batch_items]
            counts = np.array([len(r.vectors) for r in chunk], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(counts)])
            yield [r.id for r in chunk], np.concatenate([r.vectors for r in chunk]), offsets

    def vectors_matrix(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every item's vectors at once: ``(ids, vectors [n_vec,D], offsets)``."""
        ids: list[str] = []
        parts: list[np.ndarray] = []
        counts: list[int] = []
        for r in self.records():
            ids.append(r.id)
            parts.append(r.vectors)
            counts.append(len(r.vectors))
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return ids, vectors, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(upserted_records, removed_ids)`` after each applied change (under the
        gallery lock; a replaced item appears in ``upserted`` only)."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.remove(fn)

    # ---- changes ----------------------------------------------------------------------

    def upsert(self, records: Iterable[Record], offset: str | None = None) -> int:
        """Insert or replace items; returns after the change is fsync'd to the log.

        Same id + same ``content_hash`` is a no-op. ``offset`` (e.g. a Redis stream id) is
        persisted atomically with the change so a replica can resume from it. Returns the
        number of items inserted or replaced.
        """
        with self._lock:
            staged: dict[str, Record] = {}
            for r in records:
                vectors = _check_vectors(r.vectors, self.dim, self.num_vectors, r.id)
                rec = Record(r.id, vectors, dict(r.metadata), r.content_hash, r.segments)
                if rec.segments is not None and len(rec.segments) != len(vectors):
                    raise ValueError(
                        f"item {r.id!r}: {len(rec.segments)} segments for {len(vectors)} vectors"
                    )
                old = self._items.get(rec.id)
                if old is not None and old.content_hash == rec.content_hash:
                    staged.pop(rec.id, None)
                    continue
                staged[rec.id] = rec
            changes = list(staged.values())
            if not changes and (offset is None or offset == self.applied_offset):
                return 0
            header = {
                "op": "u",
                "offset": offset,
                "items": [
                    {
                        "id": r.id,
                        "hash": r.content_hash,
                        "meta": r.metadata,
                        "seg": r.segments,
                        "k": len(r.vectors),
                    }
                    for r in changes
                ],
            }
            self._log.append([pack_change(header, [r.vectors.tobytes() for r in changes])])
            self._apply_upsert(changes, offset)
            self._after_change(changes, [])
            return len(changes)

    def remove(self, ids: Iterable[str], offset: str | None = None) -> int:
        """Remove items (unknown ids are ignored); durable on return. Returns how many."""
        with self._lock:
            present = list(dict.fromkeys(i for i in ids if i in self._items))
            if not present and (offset is None or offset == self.applied_offset):
                return 0
            self._log.append([pack_change({"op": "r", "ids": present, "offset": offset}, [])])
            self._apply_remove(present, offset)
            self._after_change([], present)
            return len(present)

    def _after_change(self, upserted: list[Record], removed: list[str]) -> None:
        if upserted or removed:
            for fn in self._listeners:
                fn(upserted, removed)
        self._since_snapshot += 1
        self._maybe_rebuild()
        if self.config.snapshot_every and self._since_snapshot >= self.config.snapshot_every:
            self.snapshot()

    def _apply_upsert(self, records: list[Record], offset: str | None) -> None:
        if records:
            replaced = [r.id for r in records if r.id in self._items]
            self._drop(replaced)
            counts = [len(r.vectors) for r in records]
            vids = np.arange(self._next_vid, self._next_vid + sum(counts), dtype=np.int64)
            self._next_vid += sum(counts)
            start = 0
            for r, n in zip(records, counts, strict=True):
                self._register(r, vids[start : start + n])
                start += n
            self._index.add(vids, np.concatenate([r.vectors for r in records]))
            self._version += 1
        if offset is not None:
            self.applied_offset = offset

    def _apply_remove(self, ids: list[str], offset: str | None) -> None:
        if ids:
            self._drop(ids)
            self._version += 1
        if offset is not None:
            self.applied_offset = offset

    def _register(self, r: Record, vids: np.ndarray) -> None:
        need = int(vids.max()) + 1
        if need > len(self._vid_item):
            size = max(need, 2 * len(self._vid_item))
            self._vid_item = np.concatenate(
                [self._vid_item, np.full(size - len(self._vid_item), -1)]
            )
            self._vid_slot = np.concatenate(
                [self._vid_slot, np.zeros(size - len(self._vid_slot), np.int32)]
            )
        idx = len(self._idx_id)
        self._idx_id.append(r.id)
        self._item_idx[r.id] = idx
        self._items[r.id] = r
        self._vids[r.id] = vids
        self._vid_item[vids] = idx
        self._vid_slot[vids] = np.arange(len(vids), dtype=np.int32)
        self._n_live += len(vids)
        if self.num_vectors > 1:
            if idx >= len(self._sets):  # grow x2: amortised O(1) per item
                shape = (max(1024, 2 * len(self._sets)), *self._sets.shape[1:])
                grown = np.zeros(shape, dtype=np.float32)
                grown[: len(self._sets)] = self._sets
                self._sets = grown
            self._sets[idx] = r.vectors  # [K,D]: upsert checked K == num_vectors

    def item_index(self, item_id: str) -> int | None:
        """Dense index of a live item (stable until the item is replaced or removed)."""
        return self._item_idx.get(item_id)

    def item_id(self, idx: int) -> str | None:
        """The item id at a dense index, or None when that item was removed/replaced."""
        return self._idx_id[idx] if 0 <= idx < len(self._idx_id) else None

    def set_vectors(self, idx: np.ndarray) -> np.ndarray:
        """Slot vectors ``[len(idx), K, D]`` of the items at dense indexes ``idx``: one
        gather from a contiguous cache kept in step with every add, replace and remove.
        Rows of removed items are zeros; check :meth:`item_id` for liveness."""
        with self._lock:
            return self._sets[np.asarray(idx, dtype=np.int64)]

    @property
    def index_capacity(self) -> int:
        """Upper bound (exclusive) of the dense item indexes handed out so far."""
        return len(self._idx_id)

    def _drop(self, ids: list[str]) -> None:
        dead: list[int] = []
        for item_id in ids:
            self._items.pop(item_id)
            vids = self._vids.pop(item_id)
            self._vid_item[vids] = -1
            idx = self._item_idx.pop(item_id)
            self._idx_id[idx] = None
            if self.num_vectors > 1:
                self._sets[idx] = 0.0
            self._n_live -= len(vids)
            dead.extend(vids.tolist())
        self._index.remove(dead)

    # ---- index lifecycle --------------------------------------------------------------

    def _new_index(self, n_vectors: int) -> VectorIndex:
        factory = self.config.factory
        if factory == "auto":
            factory = auto_factory(n_vectors, self.dim, self.config, self.num_vectors)
        return VectorIndex(self.dim, factory, self.config.use_gpu)

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        vids = [self._vids[r.id] for r in self._items.values()]
        if not vids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return np.concatenate(vids), np.concatenate([r.vectors for r in self._items.values()])

    def _maybe_rebuild(self) -> None:
        n, cfg = self._n_live, self.config
        # "auto" only grows to a bigger index on its own; rebuild() re-chooses freely.
        grow = cfg.factory == "auto" and outgrown(
            self._index.factory, auto_factory(n, self.dim, cfg, self.num_vectors)
        )
        if grow or len(self._index.tombstones) > max(1000, n // 4):
            self.rebuild()

    def rebuild(self) -> None:
        """Rebuild the FAISS index from the records (re-choosing "auto") and re-tune it."""
        with self._lock:
            t0 = time.perf_counter()
            vids, vectors = self._live_vectors()
            index = self._new_index(len(vids))
            if len(vids):
                if not index.is_trained:
                    rng = np.random.default_rng(0)
                    sample = vectors[
                        rng.choice(len(vectors), min(len(vectors), 200_000), replace=False)
                    ]
                    index.train(sample)
                index.add(vids, vectors)
                if self.num_vectors > 1:  # the shortlist needs the 10 best items' slots
                    index.tune(
                        vids,
                        vectors,
                        self.config,
                        depth=10 * self.num_vectors,
                        min_recall=self.config.set_min_recall,
                    )
                else:
                    index.tune(vids, vectors, self.config)
            self._index = index
            logger.info(
                "gallery %s: rebuilt %s over %d vectors in %.1fs",
                self.path,
                index.factory,
                len(vids),
                time.perf_counter() - t0,
            )

    # ---- search -----------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int, filter: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Top-``k`` items per single-vector query ``[Q,D]`` (or ``[D]``), best vector per item,
        optional metadata equality filter. Set items (``num_vectors > 1``) are searched from
        above, by :func:`index.multivector.search_items`, over this gallery's public reads."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 3 or self.num_vectors > 1:
            raise ValueError(
                "set items are searched by index.multivector.search_items (Smooth-Chamfer "
                "re-rank), not by the gallery"
            )
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q,{self.dim}], got {list(q.shape)}")
        return self.search_vectors(q, k, filter)

    def search_vectors(
        self, q: np.ndarray, k: int, filter: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Item-level top-``k`` for single-vector queries ``[Q,D]`` (max over an item's vectors)."""
        with self._lock:
            return [self.to_hits(c) for c in self.search_candidates(q, k, filter)]

    def to_hits(self, c: Candidates) -> list[Hit]:
        """Hits for candidates (call under the same lock hold, or accept a removed item)."""
        hits = []
        for idx, score, slot in zip(
            c.idx.tolist(), c.scores.tolist(), c.slots.tolist(), strict=True
        ):
            item_id = self._idx_id[idx]
            rec = self._items.get(item_id) if item_id is not None else None
            if rec is None or item_id is None:
                continue
            hits.append(Hit(item_id, float(score), slot if rec.segments is not None else None))
        return hits

    def search_candidates(
        self, q: np.ndarray, n: int, filter: dict[str, Any] | None = None, group: int = 1
    ) -> list[Candidates]:
        """Like :meth:`search_vectors` but as arrays of dense item indexes (no Python objects
        per candidate): the fast path for large shortlists (QB-Norm, re-ranking).

        ``group``: consecutive runs of ``group`` rows of ``q`` are one query (a set query's
        slots) whose item score is the best over its rows and the item's vectors
        (max-of-max); one :class:`Candidates` per group. Each row is searched
        ``n * vectors-per-item * slack / group`` deep, deeper (x4) until the top ``n`` is
        certain: ``n`` items found and the ``n``-th scores at least every row's deepest
        neighbour, so no unseen item can beat it (for ``group=1`` the first already implies
        the second). Ties go to the lower dense item index (the item added first).
        """
        with self._lock:
            if len(q) % group:
                raise ValueError(f"{len(q)} query rows do not split into groups of {group}")
            n_groups = len(q) // group
            empty = Candidates(
                np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32)
            )
            if n <= 0 or self._n_live == 0 or n_groups == 0:
                return [empty for _ in range(n_groups)]
            ntotal = self._index.ntotal
            per_item = self._n_live / max(1, len(self._items))
            # single-vector items need no room for duplicates; segmented or set items do
            slack = 4.0 if filter else 1.0 if per_item == 1 else 1.5
            fetch = math.ceil(n * per_item * slack / group) + len(self._index.tombstones)
            results: list[Candidates | None] = [None] * n_groups
            pending = np.arange(n_groups)
            while len(pending):
                fetch = min(fetch, ntotal)
                rows = (pending[:, None] * group + np.arange(group)).ravel()
                if filter is not None and fetch * 4 > ntotal:
                    # Few items match: exact scan over the matching items is cheaper and exact.
                    found = self._exact_filtered(q[rows], n, filter, group)
                    for g, c in zip(pending, found, strict=True):
                        results[g] = c
                    break
                scores, vids = self._index.search(q[rows], fetch)
                still = []
                for j, g in enumerate(pending):
                    part = slice(j * group, (j + 1) * group)
                    c = self._collect(scores[part], vids[part], n, filter)
                    # a row that came back short has nothing deeper to offer: no bound
                    full = vids[part, -1] >= 0
                    bound = float(scores[part, -1][full].max()) if full.any() else -np.inf
                    done = len(c.idx) >= n and float(c.scores[n - 1]) >= bound
                    if done or fetch >= ntotal or len(c.idx) >= len(self._items):
                        results[g] = c
                    else:
                        still.append(g)
                pending = np.array(still, dtype=np.int64)
                fetch *= 4
            return [r if r is not None else empty for r in results]

    def _collect(
        self, scores: np.ndarray, vids: np.ndarray, n: int, flt: dict[str, Any] | None
    ) -> Candidates:
        """Top-``n`` items over one query's result rows ``[G, fetch]``: each item's best
        vector, best first, ties to the lower item index."""
        scores, vids = scores.ravel(), vids.ravel()
        ok = vids >= 0  # -1 pads short results
        vids, scores = vids[ok], scores[ok]
        items = self._vid_item[vids]
        live = items >= 0  # removed vectors (tombstones) map to -1
        items, scores, vids = items[live], scores[live], vids[live]
        order = np.argsort(-scores, kind="stable")
        if len(order) > 1 and np.any(np.diff(scores[order]) == 0):
            order = np.lexsort((items, -scores))  # equal scores: the lower item index first
        items, scores, vids = items[order], scores[order], vids[order]
        _, first = np.unique(items, return_index=True)  # best vector per item
        first.sort()
        if flt is not None:
            keep = []
            for j in first.tolist():
                item_id = self._idx_id[items[j]]
                if item_id is not None and _matches(self._items[item_id].metadata, flt):
                    keep.append(j)
                    if len(keep) == n:
                        break
            first = np.array(keep, dtype=np.int64)
        first = first[:n]
        return Candidates(items[first], scores[first], self._vid_slot[vids[first]])

    def _exact_filtered(
        self, q: np.ndarray, n: int, flt: dict[str, Any], group: int = 1
    ) -> list[Candidates]:
        n_groups = len(q) // group
        recs = [r for r in self._items.values() if _matches(r.metadata, flt)]
        if not recs:
            e = Candidates(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32))
            return [e for _ in range(n_groups)]
        counts = np.array([len(r.vectors) for r in recs])
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        idx = np.array([self._item_idx[r.id] for r in recs], dtype=np.int64)
        s = q @ np.concatenate([r.vectors for r in recs]).T  # [Q, n_vec]
        s = s.reshape(n_groups, group, -1).max(axis=1)  # [groups, n_vec]: best row per vector
        best = np.maximum.reduceat(s, offsets, axis=1)  # [groups, n_items]
        out = []
        for row in range(n_groups):
            order = np.argsort(-best[row], kind="stable")[:n]
            slots = [int(np.argmax(s[row, offsets[i] : offsets[i] + counts[i]])) for i in order]
            out.append(Candidates(idx[order], best[row, order], np.array(slots, dtype=np.int32)))
        return out

    # ---- persistence ------------------------------------------------------------------

    def _files(self, prefix: str) -> dict[int, Path]:
        out = {}
        for p in self.path.glob(f"{prefix}.*"):
            m = re.fullmatch(rf"{prefix}\.(\d+)(\.faiss|\.bin)?", p.name)
            if m:
                out[int(m.group(1))] = p
        return out

    def _open(self) -> None:
        snaps = self._files("snapshot")
        if snaps:
            self._gen = max(snaps)
            self._load_snapshot(snaps[self._gen], self.path / f"index.{self._gen}.faiss")
        replayed = 0
        for gen in sorted(g for g in self._files("log") if g >= self._gen):
            log = WriteAheadLog(self.path / f"log.{gen}", fsync=self.config.fsync)
            for payload in log.replay():
                self._replay(payload)
                replayed += 1
            self._gen = gen
        self._since_snapshot = replayed
        self._log = WriteAheadLog(self.path / f"log.{self._gen}", fsync=self.config.fsync)
        self._log.records = replayed
        self._remove_stale()
        self._maybe_rebuild()
        logger.info(
            "gallery %s: %d items (%s), version %d, %d log records replayed",
            self.path,
            len(self._items),
            self._index.factory,
            self._version,
            replayed,
        )

    def _replay(self, payload: bytes) -> None:
        header, blob = unpack_change(payload)
        if header["op"] == "u":
            recs, pos = [], 0
            for it in header["items"]:
                n = it["k"] * self.dim * 4
                v = (
                    np.frombuffer(blob[pos : pos + n], dtype=np.float32)
                    .reshape(it["k"], self.dim)
                    .copy()
                )
                v.flags.writeable = False
                pos += n
                seg = [tuple(s) for s in it["seg"]] if it["seg"] is not None else None
                recs.append(Record(it["id"], v, it["meta"], it["hash"], seg))
            self._apply_upsert(recs, header["offset"])
        elif header["op"] == "r":
            self._apply_remove([i for i in header["ids"] if i in self._items], header["offset"])
        else:
            raise ValueError(f"unknown log op {header['op']!r}")

    def _remove_stale(self) -> None:
        for prefix in ("snapshot", "index", "log"):
            for gen, p in self._files(prefix).items():
                if gen < self._gen:
                    p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)

    def snapshot(self) -> None:
        """Write a complete snapshot atomically, then drop the logs it covers."""
        with self._lock:
            t0 = time.perf_counter()
            gen = self._gen + 1
            index_crc = write_index(
                self.path / f"index.{gen}.faiss", self._index.serialize(), self.config.fsync
            )
            records = list(self._items.values())
            header = {
                "dim": self.dim,
                "num_vectors": self.num_vectors,
                "version": self._version,
                "applied_offset": self.applied_offset,
                "next_vid": self._next_vid,
                "factory": self._index.factory,
                "params": self._index.params,
                "tombstones": sorted(self._index.tombstones),
                "index_crc": index_crc,
                "items": [
                    {
                        "id": r.id,
                        "hash": r.content_hash,
                        "meta": r.metadata,
                        "seg": r.segments,
                        "vids": self._vids[r.id].tolist(),
                    }
                    for r in records
                ],
            }

            write_snapshot(
                self.path / f"snapshot.{gen}.bin",
                header,
                (r.vectors for r in records),
                self.config.fsync,
            )
            # The snapshot is durable: switch to a fresh log generation, drop older files.
            self._log.close()
            self._gen = gen
            self._log = WriteAheadLog(self.path / f"log.{gen}", fsync=self.config.fsync)
            self._since_snapshot = 0
            self._remove_stale()
            if self.config.fsync:
                fsync_dir(self.path)
            logger.info(
                "gallery %s: snapshot %d (%d items) in %.2fs",
                self.path,
                gen,
                len(records),
                time.perf_counter() - t0,
            )

    def _load_snapshot(self, path: Path, index_path: Path) -> None:
        header, body = read_snapshot(path)
        if header["dim"] != self.dim or header["num_vectors"] != self.num_vectors:
            raise ValueError(
                f"{path}: snapshot has dim={header['dim']} num_vectors={header['num_vectors']}, "
                f"gallery opened with dim={self.dim} num_vectors={self.num_vectors}"
            )
        index_bytes = read_index(index_path, header["index_crc"])
        all_vectors = np.frombuffer(body, dtype=np.float32).reshape(-1, self.dim)
        pos = 0
        for it in header["items"]:
            vids = np.asarray(it["vids"], dtype=np.int64)
            v = all_vectors[pos : pos + len(vids)]
            pos += len(vids)
            seg = [tuple(s) for s in it["seg"]] if it["seg"] is not None else None
            self._items[it["id"]] = Record(it["id"], v, it["meta"], it["hash"], seg)
            self._register(self._items[it["id"]], vids)
        self._version = header["version"]
        self.applied_offset = header["applied_offset"]
        self._next_vid = header["next_vid"]
        self._index = VectorIndex.deserialize(
            index_bytes, self.dim, header["factory"], self.config.use_gpu
        )
        self._index.restore_tombstones(header["tombstones"])
        for name, value in header["params"].items():
            self._index.set_param(name, value)

    def close(self) -> None:
        """Close the log (every change is already durable; no snapshot is forced)."""
        with self._lock:
            self._log.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
