"""Frozen-backbone feature cache: fp16, memory-mapped, keyed by backbone and input size.

Training the pooling / set heads only needs what the frozen backbones output, so we run the
backbones once per dataset split and keep their outputs on disk:

- images: grid features ``[n, N, C]`` fp16 (``image_feats.npy``) + ``image_lengths.npy``;
- texts: token features stored flat, ``[T, C]`` fp16 (``text_feats.npy``), with
  ``text_offsets.npy`` ``[n + 1]`` so caption ``j`` is ``text_feats[off[j]:off[j + 1]]``
  (no padding on disk; captions are short and the cap is ``max_length`` tokens).

Image and text caches live in separate folders so that, e.g., an EfficientNet-Lite2 run reuses
the MiniLM text cache. Folder names carry the backbone, the image size / max length and a hash
of the image / caption list, so a changed dataset never reads stale features. A cache is only
used once its ``meta.json`` says ``complete``; an interrupted extraction starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from models.data import CaptionDataset

__all__ = [
    "CachedFeatures",
    "extract_image_features",
    "extract_text_features",
    "image_cache_dir",
    "load_features",
    "load_image",
    "load_mirrored_image",
    "pad_tokens",
    "text_cache_dir",
]

logger = logging.getLogger(__name__)


class ImageBackboneLike(Protocol):
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor: ...
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TextBackboneLike(Protocol):
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]: ...
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def image_cache_dir(
    root: str | Path,
    ds: CaptionDataset,
    backbone: str,
    image_size: int,
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    tune_blocks: int = 0,
    mirrored: bool = False,
) -> Path:
    """Folder of the image-feature cache for ``ds`` under ``root``.

    The pixel normalisation (``mean``/``std``) is part of the key: the same backbone fed
    differently normalised pixels gives different features. So is the cut point: with
    ``tune_blocks`` > 0 the cache holds the trunk's output below the tuned blocks. A
    ``mirrored`` cache holds the features of the horizontally flipped photos (flip
    augmentation), in the same row order.
    """
    norm = hashlib.sha1(repr((tuple(mean), tuple(std))).encode()).hexdigest()[:6]
    cut = f"-cut{tune_blocks}" if tune_blocks else ""
    flip = "-flip" if mirrored else ""
    split = f"{ds.split}-{ds.image_fingerprint()}"
    key = f"img-{_slug(backbone)}-{image_size}-n{norm}{cut}{flip}-{split}"
    return Path(root) / _slug(ds.name) / key


def text_cache_dir(
    root: str | Path, ds: CaptionDataset, backbone: str, max_length: int, tune_layers: int = 0
) -> Path:
    """Folder of the text-feature cache for ``ds`` under ``root`` (with ``tune_layers`` > 0
    it holds the hidden states below the tuned layers)."""
    cut = f"-cut{tune_layers}" if tune_layers else ""
    key = f"txt-{_slug(backbone)}-{max_length}{cut}-{ds.split}-{ds.caption_fingerprint()}"
    return Path(root) / _slug(ds.name) / key


def _is_complete(path: Path) -> bool:
    meta = path / "meta.json"
    return meta.exists() and json.loads(meta.read_text()).get("complete", False)


def _write_meta(path: Path, **fields: Any) -> None:
    (path / "meta.json").write_text(json.dumps({"complete": True, **fields}, indent=2))


def _resume_point(out: Path, total: int) -> int:
    """Rows already extracted by an interrupted run (0 = start over)."""
    progress, feats = out / "progress.json", out / "image_feats.npy"
    if not (progress.exists() and feats.exists() and (out / "image_lengths.partial.npy").exists()):
        return 0
    shape = np.load(feats, mmap_mode="r").shape
    done = int(json.loads(progress.read_text()).get("done", 0))
    return done if shape[0] == total and 0 < done <= total else 0


def load_image(path: Path) -> Image.Image:
    """The photo at ``path`` as RGB (the default loader of an image cache)."""
    with Image.open(path) as im:
        return im.convert("RGB")


def load_mirrored_image(path: Path) -> Image.Image:
    """The photo at ``path``, flipped left to right (the loader of a mirrored cache)."""
    return ImageOps.mirror(load_image(path))


@torch.no_grad()
def extract_image_features(
    backbone: ImageBackboneLike,
    images: Sequence[Path],
    out_dir: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    loader: Callable[[Path], Image.Image] = load_image,
    progress: bool = True,
) -> Path:
    """Run ``backbone`` over ``images`` and store its grid features in ``out_dir`` (fp16).

    Returns ``out_dir``; does nothing when a complete cache is already there.
    """
    out = Path(out_dir)
    if _is_complete(out):
        return out
    feats_mm: np.memmap | None = None
    lengths = np.zeros(len(images), dtype=np.int32)
    done = _resume_point(out, len(images))
    if done:  # an interrupted extraction: keep the rows already written
        feats_mm = np.load(out / "image_feats.npy", mmap_mode="r+")  # type: ignore[assignment]
        lengths[:done] = np.load(out / "image_lengths.partial.npy")[:done]
        logger.info("resuming image features at %d/%d -> %s", done, len(images), out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    start = time.perf_counter()
    bar = tqdm(
        total=len(images), initial=done, desc=f"image features -> {out.name}", disable=not progress
    )
    for lo in range(done, len(images), batch_size):
        batch = [loader(Path(p)) for p in images[lo : lo + batch_size]]
        pixels = backbone.preprocess(batch).to(device)
        feats, lens = backbone(pixels)  # [b, N, C], [b]
        if feats_mm is None:
            _, n, c = feats.shape
            feats_mm = np.lib.format.open_memmap(
                out / "image_feats.npy", mode="w+", dtype=np.float16, shape=(len(images), n, c)
            )
        feats_mm[lo : lo + len(batch)] = feats.float().cpu().numpy().astype(np.float16)
        lengths[lo : lo + len(batch)] = lens.cpu().numpy()
        if (lo // batch_size) % 16 == 15:  # checkpoint progress now and then (resumable)
            feats_mm.flush()
            np.save(out / "image_lengths.partial.npy", lengths)
            (out / "progress.json").write_text(json.dumps({"done": lo + len(batch)}))
        bar.update(len(batch))
    bar.close()
    assert feats_mm is not None, "no images to extract"
    feats_mm.flush()
    del feats_mm
    np.save(out / "image_lengths.npy", lengths)
    for name in ("progress.json", "image_lengths.partial.npy"):
        (out / name).unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    _write_meta(out, num_images=len(images), seconds=round(elapsed, 1))
    logger.info("image features: %d images in %.0f s -> %s", len(images), elapsed, out)
    return out


@torch.no_grad()
def extract_text_features(
    backbone: TextBackboneLike,
    captions: Sequence[str],
    out_dir: str | Path,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Run ``backbone`` over ``captions`` and store flat fp16 token features in ``out_dir``."""
    out = Path(out_dir)
    if _is_complete(out):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    # Sort by length so batches carry little padding; write back in the original order.
    order = np.argsort([len(c) for c in captions], kind="stable")
    chunks: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(captions), desc=f"text features -> {out.name}", disable=not progress)
    for lo in range(0, len(captions), batch_size):
        idx = order[lo : lo + batch_size]
        tok = backbone.tokenize([captions[i] for i in idx])
        feats, lens = backbone(tok["input_ids"].to(device), tok["attention_mask"].to(device))
        feats16 = feats.float().cpu().numpy().astype(np.float16)
        for row, i in enumerate(idx):
            chunks[int(i)] = feats16[row, : int(lens[row])]
        bar.update(len(idx))
    bar.close()
    lengths = np.array([len(chunks[i]) for i in range(len(captions))], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dim = chunks[0].shape[1]
    flat = np.lib.format.open_memmap(
        out / "text_feats.npy", mode="w+", dtype=np.float16, shape=(int(offsets[-1]), dim)
    )
    for i in range(len(captions)):
        flat[offsets[i] : offsets[i + 1]] = chunks[i]
    flat.flush()
    del flat
    np.save(out / "text_offsets.npy", offsets)
    elapsed = time.perf_counter() - start
    _write_meta(out, num_captions=len(captions), seconds=round(elapsed, 1))
    logger.info("text features: %d captions in %.0f s -> %s", len(captions), elapsed, out)
    return out


def pad_tokens(
    flat: np.ndarray, offsets: np.ndarray, idx: Sequence[int] | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather captions ``idx`` from flat token storage into a padded batch ``[b, L, C]``."""
    lens = np.array([offsets[i + 1] - offsets[i] for i in idx], dtype=np.int64)
    out = np.zeros((len(idx), int(lens.max()), flat.shape[1]), dtype=np.float32)
    for row, i in enumerate(idx):
        out[row, : lens[row]] = flat[offsets[i] : offsets[i + 1]]
    return torch.from_numpy(out), torch.from_numpy(lens)


@dataclass
class CachedFeatures:
    """Memory-mapped backbone features of one dataset split.

    ``caption_to_image[j]`` is the image of caption ``j`` (as in `CaptionDataset`).
    """

    image_feats: np.ndarray  # [n_img, N, C] fp16, memory-mapped
    image_lengths: np.ndarray  # [n_img]
    text_feats: np.ndarray  # [T, C] fp16 flat, memory-mapped
    text_offsets: np.ndarray  # [n_cap + 1]
    caption_to_image: np.ndarray  # [n_cap]

    @property
    def num_images(self) -> int:
        return len(self.image_lengths)

    @property
    def num_captions(self) -> int:
        return len(self.text_offsets) - 1

    def images(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Image grid features ``[b, N, C]`` float32 and lengths ``[b]``."""
        idx = np.asarray(idx)
        order = np.argsort(idx)  # memmap fancy indexing reads faster in order
        feats = np.empty((len(idx), *self.image_feats.shape[1:]), dtype=np.float32)
        feats[order] = self.image_feats[idx[order]]
        return torch.from_numpy(feats), torch.from_numpy(self.image_lengths[idx].astype(np.int64))

    def texts(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption token features ``[b, L, C]`` float32 (zero padded) and lengths ``[b]``."""
        return pad_tokens(self.text_feats, self.text_offsets, idx)

    def in_memory(self) -> CachedFeatures:
        """A copy held in RAM (faster random access when it fits)."""
        return CachedFeatures(
            np.ascontiguousarray(self.image_feats),
            np.asarray(self.image_lengths),
            np.ascontiguousarray(self.text_feats),
            np.asarray(self.text_offsets),
            np.asarray(self.caption_to_image),
        )


def load_features(
    image_dir: str | Path, text_dir: str | Path, caption_to_image: np.ndarray
) -> CachedFeatures:
    """Open complete image and text caches (memory-mapped, read-only)."""
    image_dir, text_dir = Path(image_dir), Path(text_dir)
    for d in (image_dir, text_dir):
        if not _is_complete(d):
            raise FileNotFoundError(f"{d}: no complete feature cache (extract it first)")
    feats = CachedFeatures(
        image_feats=np.load(image_dir / "image_feats.npy", mmap_mode="r"),
        image_lengths=np.load(image_dir / "image_lengths.npy"),
        text_feats=np.load(text_dir / "text_feats.npy", mmap_mode="r"),
        text_offsets=np.load(text_dir / "text_offsets.npy"),
        caption_to_image=np.asarray(caption_to_image, dtype=np.int64),
    )
    assert feats.num_captions == len(feats.caption_to_image), "caption cache / dataset mismatch"
    assert int(feats.caption_to_image.max()) < feats.num_images, "image cache / dataset mismatch"
    return feats
