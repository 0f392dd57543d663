"""Consistent backups of a service's index: galleries (snapshot + WAL), querybank, manifest.

``create_snapshot(state, dest)`` holds every gallery's lock at once, so no upsert or remove
lands in one gallery and not another while it runs; for each gallery it writes a fresh gallery
snapshot (``Gallery.snapshot``: records + FAISS index, which rotates the WAL) and, still under
the locks, hard-links the (immutable) snapshot and index files into ``dest`` and copies the
(just rotated, so nearly empty) WAL. The locks are held for the snapshot writes plus a few
links, not for a copy of the data. The serving model's querybanks are written as
``querybank/<model>.<direction>.npz`` (the embedded store's format), and ``manifest.json``
records the model, dimensions, item counts, gallery versions and a sha256 per file.

The layout of ``dest`` mirrors a data dir (``index/<model>/<modality>/...``, ``querybank/``),
so ``restore_snapshot(src, settings)`` copies it into a fresh data dir (embedded: querybank
files; Redis mode: the querybank goes to Redis) after checking the checksums, and a service
started there answers every search exactly as the one that was backed up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "xmodal-snapshot/1"
_GALLERY_FILE = re.compile(r"(snapshot|index|log)\.\d+(\.bin|\.faiss)?")


class SnapshotError(Exception):
    """A snapshot that cannot be made or restored (message says why)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def create_snapshot(state: Any, dest: Path) -> dict[str, Any]:
    """Write a consistent snapshot of ``state`` (a ServiceState) into the empty dir ``dest``."""
    from index.querybank import DIRECTIONS, FileQueryBankStore

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SnapshotError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    galleries: dict[str, Any] = dict(sorted(state.galleries.items()))
    info: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for gallery in galleries.values():  # one fixed order: no lock-order deadlock
            stack.enter_context(gallery.lock)
        for modality, gallery in galleries.items():
            gallery.snapshot()
            src = Path(gallery.path)
            rel = Path("index") / src.parent.name / modality
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir()):
                if not _GALLERY_FILE.fullmatch(f.name):
                    continue
                if f.name.startswith("log."):
                    shutil.copy2(f, dest / rel / f.name)  # the live WAL keeps growing
                else:
                    _link_or_copy(f, dest / rel / f.name)  # immutable once written
            info[modality] = {
                "path": str(rel),
                "items": len(gallery),
                "version": int(gallery.version),
                "applied_offset": gallery.applied_offset,
            }
    banks: dict[str, int] = {}
    if state.querybank is not None:
        store = FileQueryBankStore(dest / "querybank")
        for direction in DIRECTIONS:
            bank = state.querybank.get(state.model_name, direction)
            if bank is not None and len(bank):
                texts = list(bank.texts)
                store.replace(state.model_name, direction, bank.vectors, texts, bank.weights_hash)
                banks[direction] = len(bank)
    files = {str(p.relative_to(dest)): _sha256(p) for p in sorted(dest.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not Path(k).name.startswith(".")}
    model = state.model
    manifest = {
        "format": FORMAT,
        "created_at": time.time(),
        "model": state.model_name,
        "embed_dim": int(model.embed_dim),
        "num_vectors": int(model.num_vectors),
        "galleries": info,
        "querybank": banks,
        "files": files,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "snapshot to %s in %.2fs: %s",
        dest,
        time.perf_counter() - t0,
        ", ".join(f"{m}={v['items']}" for m, v in info.items()),
    )
    return manifest


def read_manifest(src: Path) -> dict[str, Any]:
    """The manifest of snapshot dir ``src``, with every file's checksum verified."""
    src = Path(src)
    path = src / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{src} holds no {MANIFEST}: not an xmodal snapshot")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise SnapshotError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: unknown snapshot format {manifest.get('format')!r}")
    for rel, digest in manifest["files"].items():
        f = src / rel
        if not f.is_file():
            raise SnapshotError(f"snapshot file missing: {rel}")
        if _sha256(f) != digest:
            raise SnapshotError(f"snapshot file corrupt (checksum mismatch): {rel}")
    return manifest


def restore_snapshot(src: Path, settings: Any, force: bool = False) -> dict[str, Any]:
    """Copy snapshot ``src`` into ``settings.data_dir`` (the service must not be running there).

    Refuses a data dir that already holds an index for the snapshot's model unless ``force``
    (then that model's galleries are replaced). The querybank goes where the service reads it
    (files under the data dir, or Redis when ``settings.redis_url`` is set).
    """
    from index.querybank import FileQueryBankStore
    from service.backends import open_backends

    src = Path(src)
    manifest = read_manifest(src)
    data_dir = Path(settings.data_dir)
    model_dirs = {Path(g["path"]).parent for g in manifest["galleries"].values()}
    for rel in model_dirs:
        target = data_dir / rel
        if target.exists() and any(target.rglob("*")):
            if not force:
                raise SnapshotError(
                    f"{target} already holds an index; restore into a fresh data dir "
                    "(or pass --force to replace it)"
                )
            shutil.rmtree(target)
    for g in manifest["galleries"].values():
        target = data_dir / g["path"]
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((src / g["path"]).iterdir()):
            if _GALLERY_FILE.fullmatch(f.name):
                shutil.copy2(f, target / f.name)
    if manifest["querybank"]:
        source = FileQueryBankStore(src / "querybank", fsync=False)
        store = open_backends(settings, parts=("querybank",)).querybank
        assert store is not None
        try:
            for direction in manifest["querybank"]:
                bank = source.get(manifest["model"], direction)
                if bank is not None:
                    texts = list(bank.texts)
                    store.replace(
                        manifest["model"], direction, bank.vectors, texts, bank.weights_hash
                    )
        finally:
            close = getattr(store, "close", None)
            if callable(close):
                close()
    logger.info("restored snapshot %s into %s", src, data_dir)
    return manifest


__all__ = ["SnapshotError", "create_snapshot", "read_manifest", "restore_snapshot"]
