"""Embeddings of a whole split through the serving path, cached on disk.

``xmodal eval --end-to-end``, the querybank builds (``xmodal querybank build|ship``) and the
score-calibration study all need the same thing: every photo and caption of a split encoded
as the service encodes them (photos decoded with PIL, the model's own preprocessing, the
ONNX Runtime engine on the CPU). :func:`embed_split` does it once per (model weights, split)
and keeps the result as two ``.npy`` files under ``cache_dir/<model>-<weights hash>/``, so a
second run (another bank size, another threshold) costs nothing. A cache entry is keyed by the
weights hash, the engine and the split's image and caption fingerprints: a retrained model or
an edited caption file never reads a stale entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from index.log import atomic_write_bytes

logger = logging.getLogger(__name__)

__all__ = ["embed_images_of", "embed_split"]


def embed_images_of(
    model: Any, paths: list[Path], batch_size: int = 32, progress: bool = False
) -> np.ndarray:
    """Photos -> float32 unit embeddings ``[n, D]``, decoded and encoded as ingest does."""
    from PIL import Image

    parts = []
    bar = tqdm(total=len(paths), desc="images", unit="img", disable=not progress)
    for lo in range(0, len(paths), batch_size):
        photos = []
        for path in paths[lo : lo + batch_size]:
            with Image.open(path) as im:
                photos.append(im.convert("RGB"))
        parts.append(model.embed_images(photos, batch_size=batch_size))
        bar.update(len(photos))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), np.float32)


def _embed_texts(model: Any, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    parts = []
    bar = tqdm(total=len(texts), desc="captions", unit="cap", disable=not progress)
    for lo in range(0, len(texts), batch_size * 8):
        chunk = texts[lo : lo + batch_size * 8]
        parts.append(model.embed_texts(chunk, batch_size=batch_size))
        bar.update(len(chunk))
    bar.close()
    return np.concatenate(parts)


def _save(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def embed_split(
    model: Any,
    ds: Any,
    cache_dir: Path | None,
    *,
    images: bool = True,
    captions: bool = True,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(images [n_img, D], captions [n_cap, D])`` of a :class:`models.data.CaptionDataset`
    through the serving path; each part read from / written to ``cache_dir`` (None = no cache).
    A part not asked for is None."""
    folder = None
    if cache_dir is not None:
        from service.loading import model_weights_hash

        folder = Path(cache_dir) / f"{model.name}-{(model_weights_hash(model) or 'x')[:16]}"
    engine = "onnx" if getattr(model, "runtime", None) is not None else "eager"
    stem = f"{ds.name}-{ds.split}-{engine}"  # the engines agree to ~1e-5, not to the bit

    def part(kind: str, fingerprint: str, compute: Any) -> np.ndarray:
        path = folder / f"{stem}-{fingerprint}.{kind}.npy" if folder is not None else None
        if path is not None and path.is_file():
            logger.info("embeddings: %s from %s", kind, path)
            return np.load(path)
        array = compute()
        if path is not None:
            _save(path, array)
            logger.info("embeddings: %s cached at %s", kind, path)
        return array

    img = txt = None
    if images:
        img = part(
            "images",
            ds.image_fingerprint(),
            lambda: embed_images_of(model, list(ds.images), batch_size, progress),
        )
    if captions:
        txt = part(
            "captions",
            ds.caption_fingerprint(),
            lambda: _embed_texts(model, list(ds.captions), 128, progress),
        )
    return img, txt
