"""Feature cache round trip with stub backbones (no weights), and size augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data import load_dataset
from models.features import (
    extract_image_features,
    extract_text_features,
    image_cache_dir,
    load_features,
    text_cache_dir,
)
from models.train import drop_features


class StubImage:
    """Grid features = mean colour repeated over 4 positions x 3 channels."""

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([torch.tensor(np.asarray(im), dtype=torch.float32) for im in images])

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        colour = pixels.mean(dim=(1, 2)) / 255  # [B, 3]
        feats = colour[:, None, :].repeat(1, 4, 1) * torch.arange(1, 5)[None, :, None]
        return feats, torch.full((len(pixels),), 4)


class StubText:
    """One token per word; token feature = (word length, position, 1)."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        words = [t.split() for t in texts]
        n = max(len(w) for w in words)
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        for i, w in enumerate(words):
            ids[i, : len(w)] = torch.tensor([len(x) for x in w])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        feats = torch.stack([ids.float(), pos.float(), torch.ones_like(pos).float()], -1)
        return feats, mask.sum(1)


def _dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(5):
        Image.new("RGB", (8, 8), (10 * i, 20, 30)).save(root / "images" / f"{i}.png")
        caps = [("w" * (j + 1) + " ") * (i + j + 1) for j in range(1 + i % 3)]
        rows.append({"image": f"{i}.png", "split": "train", "captions": caps})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_cache_round_trip(tmp_path: Path) -> None:
    ds = load_dataset(_dataset(tmp_path / "d"), "train")
    img_dir = image_cache_dir(tmp_path / "cache", ds, "stub", 8)
    txt_dir = text_cache_dir(tmp_path / "cache", ds, "stub", 64)
    assert img_dir != image_cache_dir(tmp_path / "cache", ds, "stub", 16)  # keyed by size
    extract_image_features(StubImage(), ds.images, img_dir, batch_size=2, progress=False)
    extract_text_features(StubText(), ds.captions, txt_dir, batch_size=3, progress=False)
    feats = load_features(img_dir, txt_dir, ds.caption_to_image)
    assert feats.image_feats.dtype == np.float16 and isinstance(feats.image_feats, np.memmap)
    assert (feats.num_images, feats.num_captions) == (5, ds.num_captions)
    x, n = feats.images([3, 0])
    ref, _ = StubImage()(StubImage().preprocess([Image.open(ds.images[3])]))
    assert torch.allclose(x[0], ref[0], atol=1e-2) and n.tolist() == [4, 4]
    t, tn = feats.texts([0, len(ds.captions) - 1])
    words = [len(ds.captions[0].split()), len(ds.captions[-1].split())]
    assert tn.tolist() == words and t.shape[1] == max(words)
    assert t[0, : words[0], 1].tolist() == list(range(words[0]))  # original token order
    assert (t[0, words[0] :] == 0).all()  # zero padding
    # A complete cache is reused: the stub is not called again.
    assert extract_image_features(None, ds.images, img_dir) == img_dir  # type: ignore[arg-type]


def test_drop_features_keeps_lengths_right() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.arange(1, 11, dtype=torch.float32).view(1, 10, 1).repeat(3, 1, 1)
    lengths = torch.tensor([10, 5, 1])
    out, new = drop_features(feats, lengths, 0.5, g)
    assert (new >= 1).all() and (new <= lengths).all()
    for row in range(3):
        kept = out[row, : new[row], 0]
        assert (kept[1:] > kept[:-1]).all()  # order preserved
        assert (kept <= lengths[row]).all()  # only valid positions survive
        assert (out[row, new[row] :] == 0).all()
    same, n2 = drop_features(feats, lengths, 0.0)
    assert same is feats and n2 is lengths
