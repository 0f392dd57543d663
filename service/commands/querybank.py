"""``xmodal querybank build|info|ship``: the QB-Norm querybanks of the serving model.

A bank holds queries of one modality: ``--modality text`` (training captions; normalises text
searches of images and videos) or ``--modality image`` (training photos; normalises image and
video searches of texts).

``xmodal querybank build --data DIR --split train [--modality image] [--limit 5000]`` encodes
the split with the configured model (``XMODAL_MODEL__*``) and stores the bank in the querybank
store the service uses (Redis when ``XMODAL_REDIS_URL`` is set, else the file store under
``XMODAL_DATA_DIR``), replacing the previous one (``--append`` to add instead). The bank records
the model's weights hash, so the service never applies it to another checkpoint.

``xmodal querybank ship --data DIR`` writes the banks that ship with the model
(``models/weights/<model>.querybank-{text,image}.safetensors``, float16), which the service
loads into an empty store on first start: the one command that regenerates them after a
retrain.

Rows are picked deterministically: captions round-robin over images (every image's first
caption, then every second caption...; duplicates dropped) so a limit below the caption
count still covers as many images as possible, as in the QB-Norm paper's 5,000-caption bank;
photos evenly spaced over the split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.commands.common import parser as make_parser

logger = logging.getLogger(__name__)

# What `ship` writes by default: the smallest banks that keep (nearly) all of the dev gain
# (docs/RESULTS.md, "QB-Norm in both directions (issue #11)").
SHIP_TEXT_ROWS = 5_000
SHIP_IMAGE_ROWS = 3_000

EXAMPLE = """\
xmodal querybank build --data ../shared/data/flickr8k --split train --limit 5000
xmodal querybank build --data ../shared/data/flickr8k --split train --modality image
xmodal querybank info
xmodal querybank ship --data ../shared/data/flickr8k   # regenerate the shipped banks
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = make_parser("xmodal querybank", __doc__.split("\n")[0], EXAMPLE)
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="encode a training split into a bank of the store")
    _data_args(build)
    build.add_argument(
        "--modality",
        choices=["text", "image"],
        default="text",
        help="the bank's queries: text (captions, default) or image (photos)",
    )
    build.add_argument("--limit", type=int, default=5000, help="bank size (default 5000)")
    build.add_argument("--append", action="store_true", help="append instead of replacing")
    build.add_argument("--data-dir", type=Path, help="override XMODAL_DATA_DIR")
    info = sub.add_parser("info", help="print each bank's size and version")
    info.add_argument("--data-dir", type=Path, help="override XMODAL_DATA_DIR")
    ship = sub.add_parser("ship", help="write the model's shipped banks (text + image files)")
    _data_args(ship)
    ship.add_argument("--text-limit", type=int, default=SHIP_TEXT_ROWS)
    ship.add_argument("--image-limit", type=int, default=SHIP_IMAGE_ROWS)
    ship.add_argument("--out", type=Path, help="folder (default: models/weights)")
    return parser.parse_args(list(argv))


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", type=Path, required=True, help="folder with captions.jsonl (e.g. flickr8k/)"
    )
    p.add_argument("--split", default="train", help="rows of this split (default train)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--embed-cache",
        type=Path,
        help="keep the split's embeddings here and reuse them (e.g. runs/embeddings)",
    )


def _dataset(data: Path, split: str) -> Any:
    from models.data import load_dataset

    if not (data / "captions.jsonl").is_file() and (data / "flickr8k" / "captions.jsonl").is_file():
        data = data / "flickr8k"
    if not data.exists():
        raise FileNotFoundError(f"no dataset at {data}")
    return load_dataset(data, split)


def caption_rows(captions: Sequence[str], caption_to_image: Sequence[int], limit: int) -> list[int]:
    """Indices of up to ``limit`` distinct captions, round-robin over images (every image's
    first caption, then every second one...); text compared whitespace-collapsed."""
    per_image: dict[int, list[int]] = {}
    for j, image in enumerate(caption_to_image):
        per_image.setdefault(int(image), []).append(j)
    groups = [per_image[i] for i in sorted(per_image)]
    out: list[int] = []
    seen: set[str] = set()
    for round_ in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if round_ < len(group):
                j = group[round_]
                text = " ".join(str(captions[j]).split())
                if text and text not in seen:
                    seen.add(text)
                    out.append(j)
                    if len(out) >= limit:
                        return out
    return out


def image_rows(num_images: int, limit: int) -> list[int]:
    """Indices of up to ``limit`` photos evenly spaced over ``num_images`` (all when fewer)."""
    if limit >= num_images:
        return list(range(num_images))
    return sorted({int(i) for i in np.linspace(0, num_images - 1, max(1, limit)).round()})


def read_captions(data: Path, split: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct captions of ``split``, round-robin over images."""
    ds = _dataset(data, split)
    return [
        " ".join(ds.captions[j].split())
        for j in caption_rows(ds.captions, ds.caption_to_image, limit)
    ]


def encode_bank(
    model: Any, ds: Any, modality: str, limit: int, batch_size: int, cache: Path | None
) -> tuple[np.ndarray, list[str], str]:
    """``(vectors, texts, source)`` of a bank of ``modality`` rows from ``ds``: captions (their
    texts) or photos (their image ids). With ``cache``, the whole split is embedded once
    there (:func:`service.commands.embed_cache.embed_split`) and rows are picked from it."""
    from service.commands.embed_cache import embed_images_of, embed_split

    if modality == "text":
        rows = caption_rows(ds.captions, ds.caption_to_image, limit)
        texts = [" ".join(ds.captions[j].split()) for j in rows]
        if cache is not None:
            _, all_txt = embed_split(model, ds, cache, images=False)
            assert all_txt is not None
            vectors = all_txt[rows]
        else:
            vectors = np.asarray(model.embed_texts(texts, batch_size=batch_size), np.float32)
        source = f"{ds.name} {ds.split}: {len(rows)} of {ds.num_captions} captions, round-robin"
    else:
        rows = image_rows(ds.num_images, limit)
        texts = [ds.image_ids[i] for i in rows]
        if cache is not None:
            all_img, _ = embed_split(model, ds, cache, captions=False, batch_size=batch_size)
            assert all_img is not None
            vectors = all_img[rows]
        else:
            vectors = embed_images_of(model, [ds.images[i] for i in rows], batch_size, True)
        source = f"{ds.name} {ds.split}: {len(rows)} of {ds.num_images} photos, evenly spaced"
    return np.ascontiguousarray(vectors, dtype=np.float32), texts, source


def _settings(args: argparse.Namespace) -> Any:
    from service.settings import Settings

    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    return Settings(**overrides)


def _store(settings: Any) -> Any:
    """The querybank store of the configured mode (the one the service reads)."""
    from service.backends import open_backends

    return open_backends(settings, parts=("querybank",)).querybank


def build(args: argparse.Namespace) -> int:
    from index.querybank import direction_of
    from service.backends import backend_mode
    from service.lifecycle import load_model
    from service.loading import model_weights_hash

    settings = _settings(args)
    ds = _dataset(args.data, args.split)
    model = load_model(settings)
    logger.info(
        "encoding a %s bank from %s/%s with %s", args.modality, ds.name, ds.split, model.name
    )
    t0 = time.perf_counter()
    vectors, texts, source = encode_bank(
        model, ds, args.modality, args.limit, args.batch_size, args.embed_cache
    )
    elapsed = time.perf_counter() - t0
    store = _store(settings)
    direction = direction_of(args.modality)
    if args.append:
        store.append(model.name, direction, vectors, texts)
    else:
        store.replace(model.name, direction, vectors, texts, model_weights_hash(model))
    bank = store.get(model.name, direction)
    summary = {
        "model": model.name,
        "modality": args.modality,
        "direction": direction,
        "encoded": len(texts),
        "size": len(bank) if bank is not None else 0,
        "version": getattr(bank, "version", None),
        "source": source,
        "encode_s": round(elapsed, 2),
        "store": "redis" if backend_mode(settings) == "redis" else str(settings.data_dir),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def ship(args: argparse.Namespace) -> int:
    """Write ``<out>/<model>.querybank-{text,image}.safetensors`` for the configured model."""
    from index.bankfile import bank_filename, write_bank_file
    from service.lifecycle import load_model
    from service.loading import model_weights_hash
    from service.seeding import shipped_bank_dir

    settings = _settings(args)
    ds = _dataset(args.data, args.split)
    model = load_model(settings)
    weights = model_weights_hash(model)
    assert weights is not None
    out_dir = shipped_bank_dir(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for modality, limit in (("text", args.text_limit), ("image", args.image_limit)):
        vectors, texts, source = encode_bank(
            model, ds, modality, limit, args.batch_size, args.embed_cache
        )
        path = out_dir / bank_filename(model.name, modality)
        size = write_bank_file(
            path,
            vectors,
            texts,
            model=model.name,
            modality=modality,
            weights_hash=weights,
            source=source,
        )
        written.append(
            {
                "modality": modality,
                "path": str(path),
                "rows": len(texts),
                "mb": round(size / 1e6, 1),
                "source": source,
            }
        )
    summary = {"model": model.name, "weights_hash": weights[:16], "banks": written}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def info(args: argparse.Namespace) -> int:
    from index.querybank import BANK_DIRECTION

    settings = _settings(args)
    store = _store(settings)
    name = settings.model.name
    if name is None:
        from models import create_model

        name = create_model(None, checkpoint=settings.model.checkpoint, device="cpu").name
    banks = {}
    for modality, direction in BANK_DIRECTION.items():
        bank = store.get(name, direction)
        banks[modality] = {
            "direction": direction,
            "size": len(bank) if bank is not None else 0,
            "version": getattr(bank, "version", None),
            "weights_hash": (bank.weights_hash or "")[:16] if bank is not None else None,
        }
    sys.stdout.write(json.dumps({"model": name, "banks": banks}) + "\n")
    return 0


def main(argv: Sequence[str]) -> int:
    """Entry point of ``xmodal querybank``."""
    args = parse_args(argv)
    from service.logging import configure_logging

    configure_logging("INFO", json_logs=False)
    actions = {"build": build, "info": info, "ship": ship}
    try:
        return actions[args.action](args)
    except (FileNotFoundError, ValueError) as exc:
        sys.stderr.write(f"xmodal querybank: {exc}\n")
        return 2
