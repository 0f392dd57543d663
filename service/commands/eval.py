"""``xmodal eval``: retrieval metrics of a checkpoint (or the shipped default) on a split.

    xmodal eval --checkpoint runs/x/best.safetensors --data ../shared/data/flickr8k \
        --split dev [--querybank-data DIR --querybank-split train] --json

prints one JSON object with ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum medr_i2t
medr_t2i``; with a query bank, the same keys prefixed ``qbnorm_`` (QB-Norm Dynamic Inverted
Softmax on text-to-image, bank = the captions of the query-bank split) and ``qbnorm_beta``.
Backbone features come from (and go to) the feature cache, so a second run is fast.

``--end-to-end`` instead evaluates what the service serves: photos decoded and preprocessed as
ingest does, encoded with the serving engine (ONNX Runtime on the CPU, ``--engine eager`` for
PyTorch), captions through ``embed_texts``; no feature cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import load_dataset
from models.evaluate import embed_cached, evaluate, similarity_matrix
from models.train import REPO, load_split_features

logger = logging.getLogger(__name__)

DEFAULT_BETA = 20.0  # QB-Norm paper's default inverse temperature


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, help=".safetensors; default: the shipped model")
    p.add_argument("--model", help="model name when no checkpoint is given (default: shipped)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder")
    p.add_argument("--split", default="dev")
    p.add_argument("--querybank-data", type=Path, help="dataset whose captions form the bank")
    p.add_argument("--querybank-split", default="train")
    p.add_argument("--beta", type=float, default=DEFAULT_BETA, help="QB-Norm inverse temperature")
    p.add_argument("--max-images", type=int, help="first N images of each split only")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "features")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="encode photos and captions with the serving model and engine (no feature cache)",
    )
    p.add_argument("--engine", choices=["onnx", "eager"], default="onnx", help="--end-to-end")
    p.add_argument("--plot", type=Path, help="write recall@K curves (raw vs QB-Norm) to a PNG")
    return p


def embed_end_to_end(model: Any, ds: Any, batch_size: int = 64) -> tuple[Any, Any]:
    """Every photo and caption of ``ds`` through the serving path -> (images, captions) tensors."""
    from PIL import Image

    parts = []
    for lo in range(0, ds.num_images, batch_size):
        photos = []
        for path in ds.images[lo : lo + batch_size]:
            with Image.open(path) as im:
                photos.append(im.convert("RGB"))
        parts.append(model.embed_images(photos, batch_size=batch_size))
    return torch.from_numpy(np.concatenate(parts)), torch.from_numpy(model.embed_texts(ds.captions))


def load_model(checkpoint: Path | None, name: str | None, device: str | torch.device) -> Any:
    """A checkpoint (config from its metadata), else the named / default shipped model."""
    if checkpoint is not None:
        from models.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, device=device)
    from models.factory import create_model

    return create_model(name, device=device)


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print the metrics (JSON with ``--json``, else a small table)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start = time.perf_counter()
    from models.device import resolve_device

    args.device = resolve_device(args.device)
    model = load_model(args.checkpoint, args.model, args.device).eval()
    ds = load_dataset(args.data, args.split)
    if args.max_images:
        ds = ds.subset(args.max_images)
    if args.end_to_end:
        return _end_to_end(args, model, ds, start)
    feats = load_split_features(ds, model.config, args.cache_dir, args.device, progress=False)
    renorm = None
    if args.querybank_data is not None:
        from index.qbnorm import dynamic_inverted_softmax

        bank_ds = load_dataset(args.querybank_data, args.querybank_split)
        if args.max_images:  # "of each split": the bank's too
            bank_ds = bank_ds.subset(args.max_images)
        bank_feats = load_split_features(bank_ds, model.config, args.cache_dir, args.device, False)
        img, _ = embed_cached(model, feats, device=args.device)
        with torch.no_grad():
            bank_txt = torch.cat(
                [
                    model.embed_text_cache(*(t.to(args.device) for t in bank_feats.texts(idx)))
                    .float()
                    .cpu()
                    for idx in np.array_split(
                        np.arange(bank_feats.num_captions), max(1, bank_feats.num_captions // 512)
                    )
                ]
            )
        bank_sims = similarity_matrix(model, img, bank_txt).T  # [bank, gallery images]
        beta = args.beta

        def renorm(sims_t2i: np.ndarray) -> np.ndarray:
            return dynamic_inverted_softmax(sims_t2i, bank_sims, beta)

    metrics: dict[str, Any] = evaluate(model, feats, device=args.device, t2i_renorm=renorm)
    if renorm is not None:
        metrics["qbnorm_beta"] = args.beta
    if args.plot is not None:
        plot_recall(model, feats, renorm, args)
        metrics["plot"] = str(args.plot)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    _report(metrics, args.json)
    return 0


def _end_to_end(args: argparse.Namespace, model: Any, ds: Any, start: float) -> int:
    from models.evaluate import retrieval_metrics

    if args.engine == "onnx" and args.device.type == "cpu":
        from models.runtime import enable_onnx
        from service.loading import default_onnx_cache

        enable_onnx(model, default_onnx_cache())
    img, txt = embed_end_to_end(model, ds)
    sims = similarity_matrix(model, img, txt)
    metrics: dict[str, Any] = retrieval_metrics(sims, ds.caption_to_image)
    if args.querybank_data is not None:
        from index.qbnorm import dynamic_inverted_softmax

        bank = load_dataset(args.querybank_data, args.querybank_split).captions
        bank_sims = similarity_matrix(model, img, torch.from_numpy(model.embed_texts(bank))).T
        renormed = dynamic_inverted_softmax(np.ascontiguousarray(sims.T), bank_sims, args.beta)
        qb = retrieval_metrics(sims, ds.caption_to_image, sims_t2i=renormed)
        metrics.update({f"qbnorm_{k}": v for k, v in qb.items()})
        metrics["qbnorm_beta"] = args.beta
    metrics["engine"] = "onnx" if model.runtime is not None else "eager"
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    _report(metrics, args.json)
    return 0


def _report(metrics: dict[str, Any], as_json: bool) -> None:
    """One JSON object, or a small table (floats to 2 decimals)."""
    if as_json:
        print(json.dumps(metrics))
        return
    for key, value in metrics.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:>20s}  {shown}")


def plot_recall(model: Any, feats: Any, renorm: Any, args: argparse.Namespace) -> None:
    """Recall@K for K = 1..50, text->image raw (and QB-Norm with a bank), image->text raw."""
    from models.evaluate import rank_i2t, rank_t2i
    from service.commands.plots import plot_recall_curves

    img, txt = embed_cached(model, feats, device=args.device)
    sims = similarity_matrix(model, img, txt)  # [n_img, n_cap]
    c2i = feats.caption_to_image
    t2i = {"raw": rank_t2i(np.ascontiguousarray(sims.T), c2i)}
    if renorm is not None:
        t2i[f"QB-Norm (beta {args.beta:g})"] = rank_t2i(renorm(np.ascontiguousarray(sims.T)), c2i)
    curves = {"text -> image": t2i, "image -> text": {"raw": rank_i2t(sims, c2i)}}
    name = getattr(model, "name", None) or getattr(model.config, "name", "model")
    title = f"{name} on {Path(args.data).name} {args.split} ({feats.num_images} images)"
    plot_recall_curves(curves, args.plot, title)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
