"""``xmodal video``: synthetic captioned clips, the video GPO's training, and its measurement.

    xmodal video clips --data ../shared/data/flickr8k --split dev --clips 150 \
        --out runs/video/clips-dev
    xmodal video train --train-clips runs/video/clips-train --dev-clips runs/video/clips-dev \
        --out runs/video/gpo
    xmodal video eval --clips runs/video/clips-dev [--checkpoint runs/video/gpo/best.safetensors]

``clips`` builds 4-8 s clips of slow pan/zoom over 2-4 photos of one split (models.video_clips).
``train`` and ``eval`` decode the clips exactly as ingestion does (``service.media.load_video``
with the ingest settings: segments of ``XMODAL_INGEST__VIDEO_SEGMENT_SECONDS``, frames per
segment), embed every frame once with the serving model and engine (ONNX Runtime on the CPU)
and cache those embeddings beside the clips (``frames-<model>-<key>.npz``); then ``train`` fits
the video GPO (models.video_pool) and ``eval`` prints one JSON object with text -> video
R@1/5/10, video -> text R@1/5/10 and segment accuracy for each pooling (``gpo`` and ``mean``
over the same frame embeddings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service.commands.common import parser as make_parser

logger = logging.getLogger(__name__)

EXAMPLE = """\
xmodal video clips --data ../shared/data/flickr8k --split train --clips 1500 \\
    --out runs/video/clips-train
xmodal video clips --data ../shared/data/flickr8k --split dev --clips 150 --out runs/video/clips-dev
xmodal video train --train-clips runs/video/clips-train --dev-clips runs/video/clips-dev \\
    --out runs/video/gpo --threads 1
xmodal video eval --clips runs/video/clips-dev --checkpoint runs/video/gpo/best.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("xmodal video", __doc__.split("\n")[0], EXAMPLE)
    sub = p.add_subparsers(dest="action", required=True)

    c = sub.add_parser("clips", help="build synthetic captioned clips from photos of one split")
    c.add_argument("--data", type=Path, required=True, help="dataset folder (captions.jsonl)")
    c.add_argument("--split", required=True, help="train (for training) or dev (for reports)")
    c.add_argument("--clips", type=int, default=150, help="number of clips")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, required=True, help="folder for the clips + clips.jsonl")
    c.add_argument("--min-photos", type=int, default=2)
    c.add_argument("--max-photos", type=int, default=4)
    c.add_argument("--min-seconds", type=float, default=4.0)
    c.add_argument("--max-seconds", type=float, default=8.0)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--checkpoint", type=Path, help="a checkpoint (default: the served model)")
        q.add_argument("--model", help="a model name (default: XMODAL_MODEL__NAME or shipped)")
        q.add_argument("--engine", choices=["onnx", "eager"], help="default: XMODAL_MODEL__RUNTIME")
        q.add_argument("--threads", type=int, help="torch CPU threads")

    t = sub.add_parser("train", help="train the video GPO on clips of train photos")
    t.add_argument("--train-clips", type=Path, required=True, help="clips of `train` photos")
    t.add_argument("--dev-clips", type=Path, required=True, help="clips of `dev` photos")
    t.add_argument("--out", type=Path, default=Path("runs/video/gpo"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--warmup-epochs", type=int, help="epochs summing every violating negative")
    t.add_argument("--whole-clip-fraction", type=float, help="windows that are whole clips")
    model_args(t)

    e = sub.add_parser("eval", help="text->video R@K and segment accuracy, GPO and mean")
    e.add_argument("--clips", type=Path, required=True, help="clips of `dev` photos")
    e.add_argument(
        "--pooling",
        nargs="+",
        choices=["gpo", "mean"],
        default=None,
        help="poolings to measure (default: gpo and mean when the model has a video GPO)",
    )
    model_args(e)
    return p


# --------------------------------------------------------------------------------- clips


def build(args: argparse.Namespace) -> int:
    from models.data import load_dataset
    from models.video_clips import build_clips, plan_clips

    ds = load_dataset(args.data, args.split)
    plans = plan_clips(
        ds,
        args.clips,
        seed=args.seed,
        photos=(args.min_photos, args.max_photos),
        seconds=(args.min_seconds, args.max_seconds),
    )
    manifest = build_clips(plans, ds, args.out)
    photos = sum(len(p.photos) for p in plans)
    print(json.dumps({"manifest": str(manifest), "clips": len(plans), "photos": photos}))
    return 0


# ----------------------------------------------------------------------------- embeddings


def _load_model(args: argparse.Namespace) -> Any:
    """The serving model (settings from XMODAL_*, flags override), eval mode."""
    from service.loading import load_serving_model
    from service.settings import Settings

    settings = Settings().model
    update: dict[str, Any] = {}
    if args.checkpoint is not None:
        update["checkpoint"] = args.checkpoint
    if args.model is not None:
        update["name"] = args.model
    if args.engine is not None:
        update["runtime"] = args.engine
    return load_serving_model(settings.model_copy(update=update))


def encoder_key(model: Any, manifest: Path, ingest: Any) -> str:
    """What the frame and caption embeddings depend on: every tensor but the video GPO's,
    the config but its video pooling, the ingest sampling and the manifest's bytes."""
    import torch

    h = hashlib.sha256()
    config = model.config.model_dump(mode="json")
    config.pop("video", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    h.update(f"{ingest.video_segment_seconds}:{ingest.video_frames_per_segment}".encode())
    h.update(manifest.read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("video_pool."):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def clip_set(model: Any, clips: Path) -> Any:
    """The clips' frame and caption embeddings (decoded as ingestion decodes), cached."""
    from models.video_clips import MANIFEST, load_manifest
    from models.video_pool import ClipSet, Segment, embed_clip_set
    from service import media
    from service.settings import Settings

    folder, plans = load_manifest(clips)
    ingest = Settings().ingest
    key = encoder_key(model, folder / MANIFEST, ingest)
    cache = folder / f"frames-{model.name}-{key}.npz"
    if cache.is_file():
        logger.info("frame embeddings from %s", cache)
        return ClipSet.load(cache), plans

    def decoded() -> Iterator[list[Segment]]:
        for plan in plans:
            video = media.load_video(folder / plan.clip, ingest)
            yield [(s.start, s.end, s.frames) for s in video.segments]

    result = embed_clip_set(model, plans, decoded())
    result.save(cache)
    logger.info("cached frame embeddings of %d clips in %s", len(plans), cache)
    return result, plans


# ---------------------------------------------------------------------------- train / eval


def train(args: argparse.Namespace) -> int:
    from models.video_pool import VideoTrainConfig, train_video_pool, video_metrics

    start = time.perf_counter()
    model = _load_model(args)
    train_set, _ = clip_set(model, args.train_clips)
    dev_set, _ = clip_set(model, args.dev_clips)
    names = ("epochs", "batch_size", "lr", "seed", "warmup_epochs", "whole_clip_fraction")
    fields = {name: getattr(args, name) for name in names}
    cfg = VideoTrainConfig(
        out_dir=args.out,
        num_threads=args.threads,
        **{k: v for k, v in fields.items() if v is not None},
    )
    model.new_video_gpo()  # a fresh GPO at exactly mean pooling
    mean = video_metrics(model, dev_set, "mean")
    best = train_video_pool(model, train_set, dev_set, cfg, data_id=Path(args.train_clips).name)
    history = json.loads((Path(args.out) / "history.json").read_text())
    top = max(history, key=lambda h: h["rsum"])
    print(
        json.dumps(
            {
                "checkpoint": str(best),
                "best_epoch": top["epoch"],
                "dev_gpo": {k: v for k, v in top.items() if k not in ("epoch", "step")},
                "dev_mean": mean,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from models.video_pool import video_metrics

    start = time.perf_counter()
    model = _load_model(args)
    clips, _ = clip_set(model, args.clips)
    poolings = args.pooling or (["gpo", "mean"] if model.video_pool is not None else ["mean"])
    out: dict[str, Any] = {
        "model": model.name,
        "engine": "onnx" if model.runtime is not None else "eager",
        "clips": clips.num_clips,
        "queries": len(clips.captions),
    }
    for pooling in poolings:
        metrics = video_metrics(model, clips, pooling)
        out[pooling] = {k: round(v, 2) for k, v in metrics.items() if k not in ("clips", "queries")}
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``xmodal video``."""
    args = build_parser().parse_args(argv)
    from service.logging import configure_logging

    configure_logging("INFO", json_logs=False)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.action == "clips":
            return build(args)
        return train(args) if args.action == "train" else evaluate(args)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"xmodal video: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
