"""Linear probe of frozen image features: which backbone / normalisation / size to cache.

    python bench/feature_probe.py --data ../shared/data/flickr8k --train-images 2000 \
        --variant efficientnet-lite0:224:imagenet --variant efficientnet-lite0:224:inception \
        --variant efficientnet-lite2:260:inception --json

For every ``backbone:size:normalisation`` variant, the grid features of the first
``--train-images`` training photos and all dev photos are mean-pooled (and max-pooled); two
linear maps (image features -> 1024, mean-pooled MiniLM tokens -> 1024) are trained with a
symmetric InfoNCE loss (temperature 0.05, AdamW 1e-3, batch 128, ``--epochs`` passes over the
captions) and the best dev RSUM over the epochs is reported. Same text features, seed and
schedule for every variant, so the RSUM differences are the image features'. This is a cheap
ranking of backbones (minutes each), not a trained model: full heads score higher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.backbones import build_image_backbone  # noqa: E402
from models.config import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD  # noqa: E402
from models.data import CaptionDataset, load_dataset  # noqa: E402
from models.evaluate import retrieval_metrics  # noqa: E402
from models.factory import get_model_config  # noqa: E402
from models.features import extract_text_features, text_cache_dir  # noqa: E402

NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}


@torch.no_grad()
def pooled_images(variant: str, paths: list[Path], batch: int = 32) -> torch.Tensor:
    """``[n, 2, C]``: mean- and max-pooled grid features of ``paths`` for a variant."""
    name, size, norm = variant.split(":")
    mean, std = NORMS[norm]
    icfg = get_model_config("effnet-lite0-minilm-gpo").image.model_copy(
        update={"backbone": name, "image_size": int(size), "mean": mean, "std": std}
    )
    backbone = build_image_backbone(icfg).eval()
    out = []
    for lo in range(0, len(paths), batch):
        images = []
        for p in paths[lo : lo + batch]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        grid, _ = backbone(backbone.preprocess(images))
        out.append(torch.stack([grid.mean(1), grid.amax(1)], 1))
    return torch.cat(out)


def pooled_texts(ds: CaptionDataset, cache_dir: Path) -> torch.Tensor:
    """``[captions, 384]`` mean-pooled MiniLM token features (the training text cache)."""
    from models.backbones import build_text_backbone

    tcfg = get_model_config("effnet-lite0-minilm-gpo").text
    tdir = text_cache_dir(cache_dir, ds, tcfg.backbone, tcfg.max_length)
    if not (tdir / "meta.json").exists():
        extract_text_features(build_text_backbone(tcfg).eval(), ds.captions, tdir)
    flat = np.load(tdir / "text_feats.npy").astype(np.float32)
    offsets = np.load(tdir / "text_offsets.npy")
    sums = np.add.reduceat(flat, offsets[:-1], axis=0)
    return torch.from_numpy((sums / np.diff(offsets)[:, None]).astype(np.float32))


def probe(
    x_train: torch.Tensor,
    t_train: torch.Tensor,
    c2i_train: np.ndarray,
    x_dev: torch.Tensor,
    t_dev: torch.Tensor,
    c2i_dev: np.ndarray,
    epochs: int,
    seed: int = 0,
) -> float:
    """Best dev RSUM of two linear maps trained with symmetric InfoNCE."""
    torch.manual_seed(seed)
    w_img, w_txt = torch.nn.Linear(x_train.shape[1], 1024), torch.nn.Linear(t_train.shape[1], 1024)
    params = [*w_img.parameters(), *w_txt.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    rng, best = np.random.default_rng(seed), 0.0
    for _ in range(epochs):
        order = rng.permutation(len(c2i_train))
        for lo in range(0, len(order) - 127, 128):
            cap = order[lo : lo + 128]
            img = c2i_train[cap]
            sims = (
                F.normalize(w_img(x_train[img]), dim=1)
                @ F.normalize(w_txt(t_train[cap]), dim=1).t()
            )
            dup = torch.from_numpy(img[:, None] == img[None, :]) & ~torch.eye(
                len(cap), dtype=torch.bool
            )
            logits, target = sims.masked_fill(dup, -1e4) / 0.05, torch.arange(len(cap))
            loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sims = F.normalize(w_img(x_dev), dim=1) @ F.normalize(w_txt(t_dev), dim=1).t()
        best = max(best, retrieval_metrics(sims.numpy(), c2i_dev)["rsum"])
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    p.add_argument("--variant", action="append", required=True, help="backbone:size:norm")
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--dev-images", type=int, default=None, help="default: the whole dev split")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    full_train, dev = load_dataset(args.data, "train"), load_dataset(args.data, "dev")
    train = full_train.subset(args.train_images)
    keep = full_train.caption_to_image < args.train_images
    t_train = pooled_texts(full_train, args.cache_dir)[torch.from_numpy(keep)]
    t_dev = pooled_texts(dev, args.cache_dir)
    if args.dev_images:
        t_dev = t_dev[torch.from_numpy(dev.caption_to_image < args.dev_images)]
        dev = dev.subset(args.dev_images)
    results = []
    for variant in args.variant:
        start = time.perf_counter()
        x_train, x_dev = pooled_images(variant, train.images), pooled_images(variant, dev.images)
        row: dict[str, object] = {"variant": variant, "extract_s": time.perf_counter() - start}
        for k, pool in enumerate(("mean", "max")):
            row[f"rsum_{pool}"] = probe(
                x_train[:, k], t_train, train.caption_to_image,
                x_dev[:, k], t_dev, dev.caption_to_image, args.epochs,
            )  # fmt: skip
        results.append(row)
        print(json.dumps(row) if args.json else row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
