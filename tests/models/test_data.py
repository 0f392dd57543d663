"""Dataset readers on tiny synthetic files (both layouts) and on the real Flickr8k when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.data import load_captions_jsonl, load_dataset, load_karpathy_json


def _jsonl(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = [
        {"image": "a.jpg", "split": "train", "captions": ["a dog", "a brown dog"]},
        {"image": "b.jpg", "split": "dev", "captions": ["a cat"]},
        {"image": "c.jpg", "split": "train", "captions": ["x", "y", "z"]},
        {"image": "d.jpg", "split": "train", "captions": []},  # no caption: skipped
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return root


def test_captions_jsonl_any_number_of_captions(tmp_path: Path) -> None:
    ds = load_captions_jsonl(_jsonl(tmp_path), "train")
    assert [p.name for p in ds.images] == ["a.jpg", "c.jpg"]
    assert ds.captions == ["a dog", "a brown dog", "x", "y", "z"]
    assert ds.caption_to_image.tolist() == [0, 0, 1, 1, 1]
    assert ds.images[0] == tmp_path / "images" / "a.jpg"
    dev = load_dataset(tmp_path, "val")  # "val" is an alias of "dev"
    assert dev.captions == ["a cat"] and dev.num_images == 1


def test_subset_and_fingerprints(tmp_path: Path) -> None:
    ds = load_dataset(_jsonl(tmp_path), "train")
    sub = ds.subset(1)
    assert sub.num_images == 1 and sub.captions == ["a dog", "a brown dog"]
    assert sub.image_fingerprint() != ds.image_fingerprint()
    assert ds.caption_fingerprint() == load_dataset(tmp_path, "train").caption_fingerprint()


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "captions.jsonl").write_text('{"image": "a.jpg", "captions": ["x"]}\n{oops\n')
    with pytest.raises(ValueError, match=":2:"):
        load_captions_jsonl(tmp_path)


def test_karpathy_json(tmp_path: Path) -> None:
    (tmp_path / "flickr30k-images").mkdir()
    data = {
        "dataset": "flickr30k",
        "images": [
            {"filename": "1.jpg", "split": "train", "sentences": [{"raw": "A man ."}]},
            {
                "filename": "2.jpg",
                "split": "val",
                "sentences": [{"raw": "Two dogs ."}, {"tokens": ["a", "dog"]}],
            },
            {"filename": "3.jpg", "split": "restval", "sentences": [{"raw": "Rest ."}]},
        ],
    }
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    dev = load_dataset(tmp_path, "dev")
    assert dev.name == "flickr30k" and dev.captions == ["Two dogs .", "a dog"]
    assert dev.images == [tmp_path / "flickr30k-images" / "2.jpg"]
    train = load_karpathy_json(tmp_path / "dataset_flickr30k.json", "train")
    assert train.num_images == 2  # restval counts as train
    strict = load_karpathy_json(
        tmp_path / "dataset_flickr30k.json", "train", restval_as_train=False
    )
    assert strict.num_images == 1


def test_karpathy_coco_filepath(tmp_path: Path) -> None:
    data = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "x.jpg",
                "split": "test",
                "sentences": [{"raw": "c"}],
            }
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    ds = load_dataset(tmp_path / "dataset_coco.json", "test")
    assert ds.images[0].parts[-2:] == ("val2014", "x.jpg")


def test_missing_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        load_dataset(tmp_path)


def test_real_flickr8k(flickr_dir: Path) -> None:
    train, dev = load_dataset(flickr_dir, "train"), load_dataset(flickr_dir, "dev")
    assert (train.num_images, dev.num_images) == (6000, 1000)
    assert dev.num_captions == 5000
    assert np.bincount(dev.caption_to_image).tolist() == [5] * 1000
    assert dev.images[0].exists()
