"""Image preprocessing: the numpy normalisation gives bitwise the pixels of the torch formula,
and fitting ahead of time (the worker does) changes nothing."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from models import create_model


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((30, 41), (64, 64), (97, 20))
    ]
    out.append(Image.new("L", (50, 33), 128))  # grey: converted to RGB
    return out


def test_preprocess_matches_the_torch_formula_bitwise() -> None:
    model = create_model("tiny-random", pretrained=False)
    b = model.image_backbone
    s = b.image_size
    images = _images()
    expected = torch.stack(
        [
            (
                TF.pil_to_tensor(i.convert("RGB").resize((s, s), Image.Resampling.BICUBIC))
                .float()
                .div_(255.0)
                - b.mean
            )
            / b.std
            for i in images
        ]
    )
    got = model.preprocess(images)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, expected)
    fitted = [model.fit_image(i) for i in images]
    assert all(f.size == (s, s) and f.mode == "RGB" for f in fitted)
    assert torch.equal(model.preprocess(fitted), expected)
    assert model.preprocess([]).shape == (0, 3, s, s)
