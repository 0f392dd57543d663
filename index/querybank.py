"""Querybank stores: the bank of typical queries QB-Norm normalises against.

A :class:`QueryBank` is keyed by (model name, direction), and a direction names the modality
of the bank's *queries* (:data:`BANK_DIRECTION`): ``"t2v"`` holds text queries (normalising
text searches of the visual galleries), ``"i2t"`` image queries and ``"v2t"`` video queries
(both normalising searches of the text gallery). Vectors are float32 ``[B,D]`` (``[B,K,D]``
for set models), one text (or source id) per row. A bank may carry the weights hash of the
model that encoded it (``weights_hash``), so a bank of another checkpoint is never applied.

Two stores behind one interface (:class:`QueryBankStore`):

- :class:`RedisQueryBankStore`: production. Vectors as one float32 blob, texts as JSON, meta
  (shape, base size, weights hash) and a version counter under
  ``{prefix}:{model}:{direction}:*``. Writes are atomic (``WATCH``/``MULTI``/``EXEC``), reads
  use one ``MULTI`` so a reader never mixes two versions; every API replica sees the same bank
  and it survives restarts.
- :class:`FileQueryBankStore`: the embedded default. One ``.npz`` per bank, replaced
  atomically (temp file, fsync, rename) under an ``flock`` so several processes can append.

``append`` de-duplicates by a hash of the normalised text and keeps at most ``cap`` rows:
the base rows (from ``replace``, e.g. training captions) stay, the oldest appended rows go
first. ``seed`` writes a bank only into a store that never held one for that key (first start
with a shipped bank; several replicas may race, one wins). Every change bumps ``version``
(never reused, also across ``replace``).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index.log import atomic_write_bytes

logger = logging.getLogger(__name__)

Direction = Literal["t2v", "i2t", "v2t"]
# The query modality of a bank -> its direction key (the one naming rule of bank keys).
BANK_DIRECTION: dict[str, Direction] = {"text": "t2v", "image": "i2t", "video": "v2t"}
DIRECTIONS: tuple[str, ...] = tuple(BANK_DIRECTION.values())
DEFAULT_CAP = 20_000  # rows per bank (the paper's bank is 5,000 training captions)


def direction_of(modality: str) -> Direction:
    """The direction key of the bank whose queries are of ``modality`` (text/image/video)."""
    try:
        return BANK_DIRECTION[modality]
    except KeyError:
        raise ValueError(
            f"no querybank for {modality!r} queries; one of {sorted(BANK_DIRECTION)}"
        ) from None


@dataclass
class QueryBank:
    """One bank: ``vectors [B,D]`` (or ``[B,K,D]``) float32 with ``texts[i]`` for row ``i``."""

    vectors: np.ndarray
    texts: list[str]
    model: str
    direction: str
    version: int = 0
    base_size: int = 0  # rows from the last replace(); appended rows follow them
    weights_hash: str | None = None  # of the model that encoded the rows, when known

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def modality(self) -> str:
        """The modality of the bank's queries (``text``, ``image`` or ``video``)."""
        return next(m for m, d in BANK_DIRECTION.items() if d == self.direction)


def text_hash(text: str) -> str:
    """De-duplication key: sha1 of the lower-cased, whitespace-collapsed text."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _check(model: str, direction: str, vectors: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not model:
        raise ValueError("model name is required")
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim not in (2, 3) or len(v) != len(texts):
        raise ValueError(f"need vectors [B,D] or [B,K,D] with B={len(texts)} texts, got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("querybank vectors contain NaN or inf")
    return v


def _merge(
    old: QueryBank | None, vectors: np.ndarray, texts: Sequence[str], cap: int
) -> tuple[np.ndarray, list[str], int]:
    """Append de-duplicated rows to ``old``; drop the oldest appended rows beyond ``cap``."""
    seen = {text_hash(t) for t in old.texts} if old is not None else set()
    keep = []
    for i, t in enumerate(texts):
        h = text_hash(t)
        if h not in seen:
            seen.add(h)
            keep.append(i)
    if old is None:
        all_v, all_t, base = vectors[keep], [texts[i] for i in keep], 0
    else:
        if len(old) and old.vectors.shape[1:] != vectors.shape[1:]:
            raise ValueError(f"bank rows are {old.vectors.shape[1:]}, got {vectors.shape[1:]}")
        all_v = np.concatenate([old.vectors, vectors[keep]]) if len(old) else vectors[keep]
        all_t, base = old.texts + [texts[i] for i in keep], old.base_size
    if len(all_t) > cap:
        extra = len(all_t) - cap
        drop_from = min(base, cap)  # base rows stay unless the base alone exceeds the cap
        idx = np.r_[0:drop_from, drop_from + extra : len(all_t)]
        all_v, all_t, base = all_v[idx], [all_t[i] for i in idx], min(base, cap)
    return np.ascontiguousarray(all_v, dtype=np.float32), all_t, base


class QueryBankStore(ABC):
    """Where querybanks live. ``cap`` bounds each bank's rows on ``append``."""

    cap: int = DEFAULT_CAP

    @abstractmethod
    def get(self, model: str, direction: str) -> QueryBank | None:
        """The current bank, or None when none was built."""

    @abstractmethod
    def version(self, model: str, direction: str) -> int:
        """The bank's version (0 when none exists); cheap, for cache checks."""

    @abstractmethod
    def replace(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int:
        """Atomically replace the bank (e.g. a fresh build from training captions), recording
        the weights hash of the model that encoded it. Returns the new version."""

    @abstractmethod
    def append(self, model: str, direction: str, vectors: np.ndarray, texts: Sequence[str]) -> int:
        """Atomically append rows whose text is new (de-dup by text hash), keeping at most
        ``cap`` rows (and the bank's weights hash). Returns the version after the call
        (unchanged if nothing was new)."""

    @abstractmethod
    def seed(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int | None:
        """Write the bank only if this store never held one for (model, direction) (its
        version is 0), atomically, so that of several replicas starting at once exactly one
        writes and a bank a user built (or deleted) is never overwritten. Returns the new
        version, or None when the store already had a bank (left untouched)."""

    @abstractmethod
    def delete(self, model: str, direction: str) -> None:
        """Remove the bank (its version counter keeps counting)."""


# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------


class RedisQueryBankStore(QueryBankStore):
    """Querybanks in Redis (see the module docstring for the key layout)."""

    def __init__(self, url: str, prefix: str = "xmodal:qb", cap: int = DEFAULT_CAP) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.cap = cap
        self._redis = redis.Redis.from_url(url)
        self._watch_error = redis.WatchError

    def _keys(self, model: str, direction: str) -> tuple[str, str, str, str]:
        base = f"{self.prefix}:{model}:{direction}"
        return f"{base}:meta", f"{base}:vectors", f"{base}:texts", f"{base}:version"

    def _read(self, pipe: Any, model: str, direction: str) -> QueryBank | None:
        meta_k, vec_k, txt_k, ver_k = self._keys(model, direction)
        meta, blob, texts, version = pipe
        if meta is None:
            return None
        m = json.loads(meta)
        vectors = np.frombuffer(blob, dtype=np.float32).reshape([-1, *m["shape"]]).copy()
        return QueryBank(
            vectors,
            json.loads(texts),
            model,
            direction,
            int(version or 0),
            m["base"],
            m.get("weights_hash"),
        )

    def get(self, model: str, direction: str) -> QueryBank | None:
        with self._redis.pipeline(transaction=True) as pipe:
            for key in self._keys(model, direction):
                pipe.get(key)
            return self._read(pipe.execute(), model, direction)

    def version(self, model: str, direction: str) -> int:
        v = self._redis.get(self._keys(model, direction)[3])
        return int(v) if v is not None else 0  # type: ignore[arg-type]

    def _write(
        self,
        pipe: Any,
        model: str,
        direction: str,
        v: np.ndarray,
        t: list[str],
        base: int,
        weights_hash: str | None,
    ) -> None:
        meta_k, vec_k, txt_k, ver_k = self._keys(model, direction)
        meta = {"shape": list(v.shape[1:]), "base": base, "weights_hash": weights_hash}
        pipe.set(meta_k, json.dumps(meta))
        pipe.set(vec_k, v.tobytes())
        pipe.set(txt_k, json.dumps(t))
        pipe.incr(ver_k)

    def replace(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int:
        v = _check(model, direction, vectors, texts)
        with self._redis.pipeline(transaction=True) as pipe:
            self._write(pipe, model, direction, v, list(texts), len(texts), weights_hash)
            version = int(pipe.execute()[-1])
        logger.info("querybank %s/%s replaced: %d rows, v%d", model, direction, len(v), version)
        return version

    def seed(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int | None:
        v = _check(model, direction, vectors, texts)
        ver_k = self._keys(model, direction)[3]
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(ver_k)  # EXEC fails if another replica seeded (or built) first
                    if pipe.get(ver_k) is not None:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    self._write(pipe, model, direction, v, list(texts), len(texts), weights_hash)
                    version = int(pipe.execute()[-1])
                    break
                except self._watch_error:
                    continue
        logger.info("querybank %s/%s seeded: %d rows, v%d", model, direction, len(v), version)
        return version

    def append(self, model: str, direction: str, vectors: np.ndarray, texts: Sequence[str]) -> int:
        v = _check(model, direction, vectors, texts)
        keys = self._keys(model, direction)
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*keys)  # optimistic lock: EXEC fails if another writer won
                    old = self._read([pipe.get(k) for k in keys], model, direction)
                    all_v, all_t, base = _merge(old, v, texts, self.cap)
                    if old is not None and len(all_t) == len(old) and all_t == old.texts:
                        pipe.unwatch()
                        return old.version
                    pipe.multi()
                    hash_ = old.weights_hash if old is not None else None
                    self._write(pipe, model, direction, all_v, all_t, base, hash_)
                    return int(pipe.execute()[-1])
                except self._watch_error:
                    continue

    def delete(self, model: str, direction: str) -> None:
        self._redis.delete(*self._keys(model, direction)[:3])
        self._redis.incr(self._keys(model, direction)[3])

    def close(self) -> None:
        self._redis.close()


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class FileQueryBankStore(QueryBankStore):
    """Querybanks as ``{dir}/{model}.{direction}.npz`` files, replaced atomically."""

    def __init__(self, dir: Path, cap: int = DEFAULT_CAP, fsync: bool = True) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cap = cap
        self.fsync = fsync
        self._lock = threading.Lock()

    def _path(self, model: str, direction: str) -> Path:
        return self.dir / f"{_safe(model)}.{direction}.npz"

    @contextmanager
    def _locked(self, model: str, direction: str) -> Iterator[None]:
        lock_path = self.dir / f".{_safe(model)}.{direction}.lock"
        with self._lock, open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load(self, model: str, direction: str) -> tuple[QueryBank | None, int]:
        path = self._path(model, direction)
        if not path.exists():
            return None, 0
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            bank = QueryBank(
                z["vectors"].copy(),
                json.loads(str(z["texts"])),
                model,
                direction,
                meta["version"],
                meta["base"],
                meta.get("weights_hash"),
            )
        return (bank if not meta.get("deleted") else None), meta["version"]

    def get(self, model: str, direction: str) -> QueryBank | None:
        return self._load(model, direction)[0]

    def _marker(self, model: str, direction: str) -> Path:
        return self.dir / f"{_safe(model)}.{direction}.version"

    def version(self, model: str, direction: str) -> int:
        """From the small version marker written after each ``.npz`` (a stat and a tiny read,
        not the bank); falls back to the ``.npz`` when the marker is missing or older."""
        try:
            marker = self._marker(model, direction)
            if marker.stat().st_mtime_ns >= self._path(model, direction).stat().st_mtime_ns:
                return int(marker.read_text(encoding="ascii"))
        except (OSError, ValueError):
            pass
        return self._load(model, direction)[1]

    def _save(
        self,
        model: str,
        direction: str,
        v: np.ndarray,
        t: list[str],
        base: int,
        version: int,
        deleted: bool = False,
        weights_hash: str | None = None,
    ) -> None:
        buf = io.BytesIO()
        meta: dict[str, Any] = {
            "version": version,
            "base": base,
            "model": model,
            "direction": direction,
            "weights_hash": weights_hash,
        }
        if deleted:
            meta["deleted"] = True
        np.savez(buf, vectors=v, texts=np.array(json.dumps(t)), meta=np.array(json.dumps(meta)))
        atomic_write_bytes(self._path(model, direction), buf.getvalue(), fsync=self.fsync)
        marker = str(version).encode("ascii")  # after the bank: never names a missing version
        atomic_write_bytes(self._marker(model, direction), marker, fsync=self.fsync)

    def replace(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int:
        v = _check(model, direction, vectors, texts)
        with self._locked(model, direction):
            version = self._load(model, direction)[1] + 1
            self._save(
                model, direction, v, list(texts), len(texts), version, weights_hash=weights_hash
            )
        logger.info("querybank %s/%s replaced: %d rows, v%d", model, direction, len(v), version)
        return version

    def seed(
        self,
        model: str,
        direction: str,
        vectors: np.ndarray,
        texts: Sequence[str],
        weights_hash: str | None = None,
    ) -> int | None:
        v = _check(model, direction, vectors, texts)
        with self._locked(model, direction):
            if self._load(model, direction)[1] != 0:
                return None
            self._save(model, direction, v, list(texts), len(texts), 1, weights_hash=weights_hash)
        logger.info("querybank %s/%s seeded: %d rows, v1", model, direction, len(v))
        return 1

    def append(self, model: str, direction: str, vectors: np.ndarray, texts: Sequence[str]) -> int:
        v = _check(model, direction, vectors, texts)
        with self._locked(model, direction):
            old, version = self._load(model, direction)
            all_v, all_t, base = _merge(old, v, texts, self.cap)
            if old is not None and all_t == old.texts:
                return version
            hash_ = old.weights_hash if old is not None else None
            self._save(model, direction, all_v, all_t, base, version + 1, weights_hash=hash_)
            return version + 1

    def delete(self, model: str, direction: str) -> None:
        with self._locked(model, direction):
            version = self._load(model, direction)[1]
            if self._path(model, direction).exists():
                self._save(model, direction, np.zeros((0, 1), np.float32), [], 0, version + 1, True)
