"""``xmodal export``: turn a training checkpoint into a file to ship or serve.

Example (how the shipped default was made)::

    xmodal export --checkpoint runs/tb4-10/best.safetensors \
        --name effnet-lite0-minilm-gpo-tuned --half \
        --out models/weights/effnet-lite0-minilm-gpo-tuned.safetensors

``--name`` renames the model (its config otherwise unchanged; it must then equal the named
registry config if one exists), ``--half`` stores the weights in float16 (half the size; they
load back as float32). Prints the written path, its size and sha256 as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from models.checkpoint import load_checkpoint, save_checkpoint
from models.factory import get_model_config, list_models


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal export", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to export")
    p.add_argument("--out", type=Path, required=True, help="destination .safetensors file")
    p.add_argument("--name", help="new model name (default: keep the checkpoint's)")
    p.add_argument("--half", action="store_true", help="store float16 weights")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    args = build_parser().parse_args(argv)
    model = load_checkpoint(args.checkpoint)
    if args.name:
        config = model.config.model_copy(update={"name": args.name})
        if args.name in list_models() and get_model_config(args.name) != config:
            raise SystemExit(
                f"xmodal export: the checkpoint's config differs from the registry config "
                f"{args.name!r} (models/configs/{args.name}.json); serving by name would not "
                "match these weights"
            )
        model.config, model.name = config, args.name
    extra = {**model.checkpoint_extra, "exported_from": str(args.checkpoint)}
    path = save_checkpoint(model, args.out, extra, dtype=torch.float16 if args.half else None)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    size_mb = round(path.stat().st_size / 1e6, 2)
    print(json.dumps({"path": str(path), "size_mb": size_mb, "sha256": digest}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
