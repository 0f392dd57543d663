"""Flip augmentation: a cache of mirrored photos' trunk features, swapped in per item."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from models.backbones import build_image_backbone
from models.data import load_dataset
from models.features import image_cache_dir
from models.train import (
    TrainConfig,
    TrunkView,
    flip_some,
    load_split_features,
    model_config_for,
    train,
)


def test_flip_some_swaps_whole_rows_with_the_given_probability() -> None:
    plain, mirrored = torch.zeros(400, 3, 2), torch.ones(400, 3, 2)
    assert torch.equal(flip_some(plain, mirrored, 0.0), plain)
    assert torch.equal(flip_some(plain, mirrored, 1.0), mirrored)
    out = flip_some(plain, mirrored, 0.5, torch.Generator().manual_seed(0))
    rows = out.flatten(1)
    assert bool(((rows == 0).all(1) | (rows == 1).all(1)).all())  # whole rows, never mixed
    assert 150 < int(rows[:, 0].sum()) < 250  # about half of 400


def test_mirrored_cache_holds_the_flipped_photos_features(flickr_dir: Path, tmp_path: Path) -> None:
    photos = sorted((flickr_dir / "images").glob("*.jpg"))[:3]
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(flickr_dir / "images")  # read in place, never copied
    rows = [
        {"image": p.name, "split": "train", "captions": [f"photo {i}"]}
        for i, p in enumerate(photos)
    ]
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_dataset(data, "train")
    mcfg = model_config_for(TrainConfig(model="tiny-random"))
    icfg = mcfg.image
    key = (tmp_path / "cache", ds, icfg.backbone, icfg.image_size, icfg.mean, icfg.std)
    assert image_cache_dir(*key, mirrored=True) != image_cache_dir(*key)

    torch.manual_seed(0)  # the random-conv trunk: the same weights for cache and reference
    mirrored = load_split_features(ds, mcfg, tmp_path / "cache", progress=False, mirrored=True)
    torch.manual_seed(0)
    plain = load_split_features(ds, mcfg, tmp_path / "cache", progress=False)
    assert image_cache_dir(*key, mirrored=True).is_dir()

    torch.manual_seed(0)
    trunk = TrunkView(build_image_backbone(icfg).eval())
    with Image.open(photos[1]) as im:
        photo = im.convert("RGB")
    with torch.no_grad():
        want, _ = trunk(trunk.preprocess([ImageOps.mirror(photo)]))
        want_plain, _ = trunk(trunk.preprocess([photo]))
    got = torch.from_numpy(np.asarray(mirrored.image_feats[1], dtype=np.float32))
    got_plain = torch.from_numpy(np.asarray(plain.image_feats[1], dtype=np.float32))
    torch.testing.assert_close(got, want[0], atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(got_plain, want_plain[0], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(got, got_plain, atol=1e-2)  # a real, different picture


def test_training_with_flip_reads_both_caches(flickr_dir: Path, tmp_path: Path) -> None:
    photos = sorted((flickr_dir / "images").glob("*.jpg"))[:12]
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(flickr_dir / "images")
    rows = [
        {
            "image": p.name,
            "split": "train" if i < 8 else "dev",
            "captions": [f"photo {i}", f"pic {i}"],
        }
        for i, p in enumerate(photos)
    ]
    (data / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(
        model="tiny-random", data=data, cache_dir=tmp_path / "cache", out_dir=tmp_path / "run",
        epochs=1, batch_size=4, image_flip=0.5, progress=False, num_threads=1,
    )  # fmt: skip
    best = train(cfg)
    assert best.exists()
    flipped = list((tmp_path / "cache").rglob("img-*-flip-train-*/meta.json"))
    assert len(flipped) == 1  # the mirrored train cache, and none for dev
    assert not list((tmp_path / "cache").rglob("img-*-flip-dev-*"))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_image_flip_is_a_probability(p: float) -> None:
    with pytest.raises(ValueError):
        TrainConfig(image_flip=p)
