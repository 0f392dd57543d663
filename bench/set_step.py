"""Cost of one training step: set model (DivE) vs GPO, side by side, on the cached features.

Both models read the same tuned-trunk cache (EfficientNet-Lite0 with ``tune_blocks: 4``, the
recipe of the shipped model) and take the same grouped batches (``--images`` photos with all
of their captions, as ``--epoch-mode grouped``).  A step is what ``models.train.train`` does:
tuned blocks, size augmentation, both heads, the loss (hardest negatives), backward, gradient
clipping and an AdamW update.  The variants run interleaved, round-robin, one torch thread,
so machine load hits them alike; the report is the median step time of each and its ratio to
the GPO step.

Variants (``--variants``):

- ``gpo``: ``effnet-lite0-minilm-gpo-tuned``.
- ``set``: ``effnet-lite0-minilm-set`` with ``tune_blocks: 4``, MMD over every slot of the
  batch (``mmd_samples`` unset: 640 captions x 4 slots against 128 images x 4 slots).
- ``set-nommd``: the same without the MMD term (what MMD costs).
- ``set-mmd<N>``: MMD over at most N slots per modality, drawn at random each step
  (``TrainConfig.mmd_samples``).
- ``set-ff<N>``: the set module's feed-forward at N x embed_dim (``head.set_ff_mult``; DivE 4).
- ``set-d<N>``: N slot-attention iterations (``head.depth``); options combine:
  ``set-ff1-d2-mmd512``.

A forward-only ``torch.profiler`` pass of the set step (``--profile``) splits its forward time
into the image head, the text head (projection, set prediction) and the loss terms.

    python bench/set_step.py --data ../shared/data/flickr8k --repeats 6 --profile --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import load_dataset
from models.train import (
    REPO,
    TrainConfig,
    _build_model,
    _loss,
    drop_features,
    load_split_features,
)

SET_OVERRIDES: dict[str, Any] = {}  # the set config already tunes the top 4 Lite0 blocks


def _variant_config(name: str, data: Path, cache: Path) -> TrainConfig:
    """``gpo``, or ``set`` followed by any of ``-ffN`` (feed-forward width multiplier),
    ``-dN`` (slot-attention iterations), ``-mmdN`` (MMD over N sampled slots) and ``-nommd``."""
    base: dict[str, Any] = {"data": data, "cache_dir": cache, "epoch_mode": "grouped"}
    if name == "gpo":
        return TrainConfig(model="effnet-lite0-minilm-gpo-tuned", **base)
    first, *options = name.split("-")
    if first != "set":
        raise ValueError(f"unknown variant {name!r}")
    head: dict[str, Any] = {}
    update: dict[str, Any] = {}
    for option in options:
        if option == "nommd":
            update["mmd_weight"] = 0.0
        elif option.startswith("mmd") and option[3:].isdigit():
            update["mmd_samples"] = int(option[3:])
        elif option.startswith("ff") and option[2:].isdigit():
            head["set_ff_mult"] = int(option[2:])
        elif option.startswith("d") and option[1:].isdigit():
            head["depth"] = int(option[1:])
        else:
            raise ValueError(f"unknown option {option!r} in variant {name!r}")
    overrides = {**SET_OVERRIDES, "head": head} if head else SET_OVERRIDES
    cfg = TrainConfig(model="effnet-lite0-minilm-set", model_overrides=overrides, **base)
    return cfg.model_copy(update=update)


def _batches(feats: Any, images: int, count: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """``count`` grouped batches: ``images`` random photos and every caption of each."""
    rng = np.random.default_rng(seed)
    c2i = feats.caption_to_image
    out = []
    for _ in range(count):
        img = np.sort(rng.choice(feats.num_images, size=images, replace=False))
        caps = np.flatnonzero(np.isin(c2i, img))
        owner = np.searchsorted(img, c2i[caps])
        out.append((img, caps, owner))
    return out


class Runner:
    """One variant: its model, optimizer and the step ``models.train.train`` takes."""

    def __init__(self, name: str, cfg: TrainConfig, feats: Any) -> None:
        self.name, self.cfg, self.feats = name, cfg, feats
        self.model = _build_model(cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(0)
        self.times: list[float] = []

    def forward(self, batch: tuple[np.ndarray, ...]) -> dict[str, torch.Tensor]:
        img_idx, cap_idx, owner = batch
        m = self.model
        x, xn = self.feats.images(img_idx)
        t, tn = self.feats.texts(cap_idx)
        with torch.profiler.record_function("image head"):
            x, xn = m.image_top(x, xn)
            x, xn = drop_features(x, xn, self.cfg.image_drop, self.gen)
            img = m.embed_image_features(x, xn)
        with torch.profiler.record_function("text head"):
            t, tn = m.text_top(t, tn)
            t, tn = drop_features(t, tn, self.cfg.token_drop, self.gen)
            txt = m.embed_text_features(t, tn)
        with torch.profiler.record_function("loss"):
            ids = torch.from_numpy(img_idx)
            return _loss(m, img, txt, ids, self.cfg, True, None, None, torch.from_numpy(owner))

    def step(self, batch: tuple[np.ndarray, ...]) -> float:
        t0 = time.perf_counter()
        parts = self.forward(batch)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        return time.perf_counter() - t0


def _profile_forward(runner: Runner, batch: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Forward milliseconds of the recorded scopes (and the MMD / uniformity ops inside)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.forward(batch)
    wanted = ("image head", "text head", "loss", "mmd", "uniformity", "smooth_chamfer")
    out = {}
    for event in prof.key_averages():
        if event.key in wanted:
            out[event.key] = event.cpu_time_total / 1000.0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "flickr8k")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "features")
    p.add_argument("--images", type=int, default=128, help="photos per grouped batch")
    p.add_argument("--repeats", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="gpo,set,set-nommd,set-mmd512")
    p.add_argument("--profile", action="store_true", help="forward profile of the set step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    names = args.variants.split(",")
    ds = load_dataset(args.data, "train")
    runners = []
    for name in names:
        cfg = _variant_config(name, args.data, args.cache_dir)
        model_cfg = _build_model(cfg).config
        feats = load_split_features(ds, model_cfg, args.cache_dir, progress=False).in_memory()
        runners.append(Runner(name, cfg, feats))
    batches = _batches(runners[0].feats, args.images, args.warmup + args.repeats, seed=0)
    for i, batch in enumerate(batches):
        for r in runners:  # round robin: every variant sees the same load and batches
            elapsed = r.step(batch)
            if i >= args.warmup:
                r.times.append(elapsed)

    gpo_ms = None
    rows = []
    for r in runners:
        ms = 1000 * statistics.median(r.times)
        gpo_ms = ms if r.name == "gpo" else gpo_ms
        rows.append({"variant": r.name, "median_ms": round(ms, 1), "steps": len(r.times)})
    for row in rows:
        row["x_gpo"] = round(row["median_ms"] / gpo_ms, 2) if gpo_ms else None
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)",
        "images": args.images,
        "captions": int(len(batches[0][1])),
        "rows": rows,
    }
    if args.profile:
        set_runner = next((r for r in runners if r.name == "set"), None)
        if set_runner is not None:
            report["set_forward_ms"] = _profile_forward(set_runner, batches[-1])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for row in rows:
            print(f"{row['variant']:>12}: {row['median_ms']:8.1f} ms  x{row['x_gpo']}")
        if "set_forward_ms" in report:
            print("set forward:", report["set_forward_ms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
