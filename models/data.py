"""Image-caption dataset readers.

Two on-disk layouts are understood:

- ``captions.jsonl`` + ``images/``: one JSON object per line,
  ``{"image": "<file>", "split": "train", "captions": ["...", ...]}`` (any number of captions
  per image). This is the layout of ``../shared/data/flickr8k``.
- Karpathy JSON (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k.json``):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw": ...}]}]}`` with the
  photos under ``images/``, ``flickr30k-images/``, ``Flicker8k_Dataset/`` or, for COCO,
  ``<filepath>/<filename>``.

Both produce a `CaptionDataset`: a list of image paths, a flat list of captions and, for each
caption, the index of its image. Split names ``dev`` and ``val`` are aliases.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CaptionDataset", "load_captions_jsonl", "load_dataset", "load_karpathy_json"]

logger = logging.getLogger(__name__)

KARPATHY_FILES = ("dataset_flickr30k.json", "dataset_coco.json", "dataset_flickr8k.json")
# Folders that hold the photos of a Karpathy-layout dataset, tried in order.
KARPATHY_IMAGE_DIRS = ("images", "flickr30k-images", "Flicker8k_Dataset", "Flickr8k_Dataset", ".")
# Split aliases: Karpathy files say "val", our jsonl says "dev".
SPLIT_ALIASES = {"dev": {"dev", "val"}, "val": {"dev", "val"}}


@dataclass
class CaptionDataset:
    """Images and their captions for one split.

    ``caption_to_image[j]`` is the index in ``images`` of the photo caption ``j`` describes.
    """

    name: str
    split: str
    images: list[Path]
    captions: list[str]
    caption_to_image: np.ndarray
    image_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        assert len(self.captions) == len(self.caption_to_image), "one image index per caption"
        if not self.image_ids:
            self.image_ids = [p.name for p in self.images]

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def image_fingerprint(self) -> str:
        """Short hash of the image list (feature-cache key: same photos, same features)."""
        h = hashlib.sha1("\n".join(self.image_ids).encode("utf-8"))
        return h.hexdigest()[:12]

    def caption_fingerprint(self) -> str:
        """Short hash of the caption list (feature-cache key for text features)."""
        h = hashlib.sha1("\n".join(self.captions).encode("utf-8"))
        return h.hexdigest()[:12]

    def subset(self, num_images: int) -> CaptionDataset:
        """The first ``num_images`` images with all their captions (for quick runs)."""
        keep = self.caption_to_image < num_images
        return CaptionDataset(
            name=self.name,
            split=self.split,
            images=self.images[:num_images],
            captions=[c for c, k in zip(self.captions, keep, strict=True) if k],
            caption_to_image=self.caption_to_image[keep],
            image_ids=self.image_ids[:num_images],
        )


def _split_matches(want: str | None, have: str) -> bool:
    if want is None or want == "all":
        return True
    return have in SPLIT_ALIASES.get(want, {want})


def _build(name: str, split: str, rows: list[tuple[Path, str, list[str]]]) -> CaptionDataset:
    images: list[Path] = []
    ids: list[str] = []
    captions: list[str] = []
    owner: list[int] = []
    for path, image_id, caps in rows:
        caps = [c.strip() for c in caps if c and c.strip()]
        if not caps:
            continue  # an image without captions cannot be evaluated either way
        owner.extend([len(images)] * len(caps))
        images.append(path)
        ids.append(image_id)
        captions.extend(caps)
    if not images:
        raise ValueError(f"no images with captions in split {split!r} of {name}")
    logger.info("%s/%s: %d images, %d captions", name, split, len(images), len(captions))
    return CaptionDataset(name, split, images, captions, np.asarray(owner), ids)


def load_captions_jsonl(data_dir: str | Path, split: str | None = None) -> CaptionDataset:
    """Read ``<data_dir>/captions.jsonl`` (photos under ``<data_dir>/images``)."""
    root = Path(data_dir)
    rows = []
    with (root / "captions.jsonl").open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image, caps = rec["image"], rec["captions"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{root / 'captions.jsonl'}:{line_no}: {exc}") from exc
            if isinstance(caps, str):
                caps = [caps]
            if _split_matches(split, rec.get("split", "train")):
                rows.append((root / "images" / image, image, list(caps)))
    return _build(root.name, split or "all", rows)


def load_karpathy_json(
    json_path: str | Path,
    split: str | None = None,
    image_root: str | Path | None = None,
    restval_as_train: bool = True,
) -> CaptionDataset:
    """Read a Karpathy split file (``dataset_flickr30k.json`` / ``dataset_coco.json``).

    ``restval`` images (COCO) count as ``train`` unless ``restval_as_train`` is False.
    """
    json_path = Path(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    if image_root is None:
        candidates = [json_path.parent / d for d in KARPATHY_IMAGE_DIRS]
        image_root = next((c for c in candidates if c.is_dir() and c.name != "."), json_path.parent)
    image_root = Path(image_root)
    rows = []
    for rec in data["images"]:
        rec_split = rec.get("split", "train")
        if restval_as_train and rec_split == "restval":
            rec_split = "train"
        if not _split_matches(split, rec_split):
            continue
        rel = Path(rec.get("filepath", "")) / rec["filename"]
        caps = [s["raw"] if "raw" in s else " ".join(s["tokens"]) for s in rec["sentences"]]
        rows.append((image_root / rel, str(rel), caps))
    name = data.get("dataset", json_path.stem.removeprefix("dataset_"))
    return _build(name, split or "all", rows)


def load_dataset(data_dir: str | Path, split: str | None = None) -> CaptionDataset:
    """Read a dataset folder in either layout (``captions.jsonl`` first, then Karpathy JSON).

    ``data_dir`` may also be the Karpathy JSON file itself.
    """
    path = Path(data_dir)
    if path.is_file() and path.suffix == ".json":
        return load_karpathy_json(path, split)
    if (path / "captions.jsonl").exists():
        return load_captions_jsonl(path, split)
    for name in KARPATHY_FILES:
        if (path / name).exists():
            return load_karpathy_json(path / name, split)
    found = sorted(p.name for p in path.glob("*.json*")) if path.is_dir() else []
    raise FileNotFoundError(
        f"{path}: expected captions.jsonl or one of {', '.join(KARPATHY_FILES)} (found {found})"
    )
