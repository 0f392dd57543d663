"""``xmodal train``: train the heads of a named model on cached backbone features.

Example (the shipped default, ``models.DEFAULT_MODEL``, on Flickr8k; docs/RESULTS.md has
the full recipes)::

    xmodal train --model effnet-lite0-minilm-gpo-tuned --data ../shared/data/flickr8k \
        --out runs/gpo-tuned --epochs 10 --epoch-mode grouped --gpo-freeze-epochs 1

Flags map one to one onto `models.train.TrainConfig`; ``--config FILE`` reads a JSON
TrainConfig first (flags given on the command line override it).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from models.train import TrainConfig, train

# flag -> TrainConfig field, for the flags that are plain values
_FIELDS = {
    "model": "model",
    "model_overrides": "model_overrides",
    "data": "data",
    "train_split": "train_split",
    "dev_split": "dev_split",
    "out": "out_dir",
    "cache_dir": "cache_dir",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_decay_epoch": "lr_decay_epoch",
    "warmup_epochs": "warmup_epochs",
    "epoch_mode": "epoch_mode",
    "image_drop": "image_drop",
    "token_drop": "token_drop",
    "image_flip": "image_flip",
    "sampler": "sampler",
    "sampler_lambda": "sampler_lambda",
    "sampler_negatives": "sampler_negatives",
    "sampler_bank_size": "sampler_bank_size",
    "sampler_refresh_every": "sampler_refresh_every",
    "time_budget": "time_budget_s",
    "target_rsum": "target_rsum",
    "max_images": "max_images",
    "device": "device",
    "threads": "num_threads",
    "backbone_lr_scale": "backbone_lr_scale",
    "gpo_lr_scale": "gpo_lr_scale",
    "gpo_freeze_epochs": "gpo_freeze_epochs",
    "mmd_samples": "mmd_samples",
    "init_from": "init_from",
    "seed": "seed",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="JSON TrainConfig to start from")
    p.add_argument("--model", help="model config name (models/configs/<name>.json)")
    p.add_argument(
        "--model-overrides",
        type=json.loads,
        help='JSON merged into the model config, e.g. \'{"image": {"image_size": 300}}\'',
    )
    p.add_argument("--data", type=Path, help="dataset folder (captions.jsonl or Karpathy JSON)")
    p.add_argument("--train-split")
    p.add_argument("--dev-split")
    p.add_argument("--out", type=Path, help="run folder (checkpoints, curves.png, history)")
    p.add_argument("--cache-dir", type=Path, help="feature cache root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-decay-epoch", type=int)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--epoch-mode", choices=["one_per_image", "all", "grouped"])
    p.add_argument("--image-drop", type=float)
    p.add_argument("--token-drop", type=float)
    p.add_argument(
        "--image-flip", type=float, help="probability of a training photo's mirror image (0: off)"
    )
    p.add_argument("--sampler", choices=["in_batch", "adaptive"])
    p.add_argument("--sampler-lambda", type=float)
    p.add_argument("--sampler-negatives", type=int)
    p.add_argument("--sampler-bank-size", type=int, help="default: every training item")
    p.add_argument("--sampler-refresh-every", type=int, help="default: (|A|-1) ln(|A|-1)")
    p.add_argument("--time-budget", type=float, help="seconds of training at most")
    p.add_argument("--target-rsum", type=float, help="stop once dev RSUM reaches this")
    p.add_argument("--max-images", type=int, help="use the first N images of each split")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--finetune-backbone", action="store_true", help="train the backbones too")
    p.add_argument(
        "--backbone-lr-scale",
        type=float,
        help="LR of fine-tuned backbone weights (full, or tune_blocks) = lr * this (0.1)",
    )
    p.add_argument("--gpo-lr-scale", type=float, help="LR of GPO weight generators = lr * this")
    p.add_argument(
        "--gpo-freeze-epochs", type=int, help="hold GPO weight generators still this many epochs"
    )
    p.add_argument(
        "--mmd-samples", type=int, help="set models: MMD over at most N slots per modality"
    )
    p.add_argument(
        "--init-from",
        type=Path,
        help="start from the matching weights of this checkpoint (e.g. a set model from the "
        "shipped GPO model)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from a JSON file (optional) overridden by the flags that were given."""
    base = json.loads(args.config.read_text()) if args.config else {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            base[field] = value
    if args.finetune_backbone:
        base["finetune_backbone"] = True
    if args.resume:
        base["resume"] = True
    if args.no_progress:
        base["progress"] = False
    return TrainConfig.model_validate(base)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print the best checkpoint path and its dev metrics."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(args)
    best = train(cfg)
    history = json.loads((best.parent / "history.json").read_text())
    top = max(history, key=lambda h: h["rsum"]) if history else {}
    print(json.dumps({"checkpoint": str(best), **top}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
